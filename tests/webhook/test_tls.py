"""The serving certificate is re-read within 15 s of a change (SPEC §9), including the
kubelet's atomic ``..data`` symlink swap used for mounted Secrets (cert-manager)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.tls import make_test_ca
from tests.webhook import _pods
from tests.webhook._fakeapi import FakeApiServer
from tests.webhook._process import WebhookProcess

RELOAD_WITHIN_SECONDS = 15.0


def _served_der(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we compare the exact certificate bytes instead
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _file_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text(encoding="utf-8"))


def _wait_served(port: int, want: bytes) -> float:
    began = time.monotonic()
    while time.monotonic() - began < RELOAD_WITHIN_SECONDS + 5:
        if _served_der(port) == want:
            return time.monotonic() - began
        time.sleep(0.25)
    raise AssertionError("the new certificate was not served")


def _pair(directory: Path) -> tuple[Path, Path]:
    make_test_ca(directory)
    return directory / "server.pem", directory / "server.key"


def _kubelet_publish(mount: Path, cert: Path, key: Path, stamp: str) -> None:
    """What the kubelet's AtomicWriter does: a new timestamped dir, then rename ..data_tmp over ..data."""
    target = mount / f"..{stamp}"
    target.mkdir()
    shutil.copy(cert, target / "tls.crt")
    shutil.copy(key, target / "tls.key")
    tmp = mount / "..data_tmp"
    tmp.symlink_to(target.name)
    os.replace(tmp, mount / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")


@pytest.fixture
def apiserver_fn(tmp_path: Path) -> Iterator[FakeApiServer]:
    fake = FakeApiServer(tmp_path / "api")
    (tmp_path / "api").mkdir()
    fake.start()
    yield fake
    fake.stop()


def _start(tmp_path: Path, api: FakeApiServer, cert: Path, key: Path, ca: Path) -> WebhookProcess:
    process = WebhookProcess(
        tmp_path,
        api.write_kubeconfig(tmp_path / "kubeconfig"),
        cert,
        key,
        ca,
        f"--sidecar-image={_pods.IMAGE}",
    )
    process.wait_ready()
    return process


def test_kubelet_symlink_swap_is_served_within_15_s(tmp_path: Path, apiserver_fn: FakeApiServer) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old_cert, old_key = _pair(tmp_path / "old")
    new_cert, new_key = _pair(tmp_path / "new")
    mount = tmp_path / "mount"
    mount.mkdir()
    _kubelet_publish(mount, old_cert, old_key, "2026_12_03_08_00_00.000000001")
    process = _start(
        tmp_path, apiserver_fn, mount / "tls.crt", mount / "tls.key", tmp_path / "old" / "ca.pem"
    )
    try:
        assert _served_der(process.port) == _file_der(old_cert)
        _kubelet_publish(mount, new_cert, new_key, "2026_12_03_09_00_00.000000002")
        took = _wait_served(process.port, _file_der(new_cert))
        assert took <= RELOAD_WITHIN_SECONDS
        # The API server trusts the new CA bundle from now on; reviews still work.
        process.ca_file = tmp_path / "new" / "ca.pem"
        assert process.review(_pods.deployment_pod("nobody")).allowed is False  # no such SA: refused
        assert process.metrics()['wif_broker_webhook_tls_reloads_total{outcome="ok"}'] == 1
    finally:
        assert process.stop() == 0


def test_in_place_rewrite_with_a_torn_pair_keeps_serving(tmp_path: Path, apiserver_fn: FakeApiServer) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old_cert, old_key = _pair(tmp_path / "old")
    new_cert, new_key = _pair(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(old_cert, live / "tls.crt")
    shutil.copy(old_key, live / "tls.key")
    process = _start(tmp_path, apiserver_fn, live / "tls.crt", live / "tls.key", tmp_path / "old" / "ca.pem")
    try:
        # Only the key is new: the pair does not match, the old certificate keeps being served.
        shutil.copy(new_key, live / "tls.key")
        time.sleep(6)  # at least one poll
        assert _served_der(process.port) == _file_der(old_cert)
        assert process.metrics()['wif_broker_webhook_tls_reloads_total{outcome="error"}'] >= 1
        shutil.copy(new_cert, live / "tls.crt")
        assert _wait_served(process.port, _file_der(new_cert)) <= RELOAD_WITHIN_SECONDS
    finally:
        assert process.stop() == 0

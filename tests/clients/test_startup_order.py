"""Start-up order: why the app must wait for the broker's ``/readyz``.

gcloud before 576.0.0 caches "not on GCE" in ``$CLOUDSDK_CONFIG/gce`` for 10
minutes after *any* failed detection, connection refused included
(``googlecloudsdk/core/credentials/gce_cache.py``: ``CheckServerRefreshAllCaches``
writes the result of ``_CheckServerWithRetry`` to disk; metadata-protocol.md
§1.6, §5.6). An app container that runs gcloud before the sidecar listens is
therefore locked out for 10 minutes, broker or not.

The shipped manifests prevent it: the k8s native sidecar's startupProbe and
ECS ``dependsOn: HEALTHY`` start the app only once ``/readyz`` is 200. The
second test plays that orchestrator: it starts with the broker, polls
``/readyz`` from before the broker binds, and launches gcloud on the first 200.

Ports are reserved by a bound, non-listening socket (connections are refused,
and no other process can take the port); the broker binds the same port with
SO_REUSEADDR, which Linux allows while nobody listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from broker import settings
from broker.fakes import FakeGoogle
from tests.clients._subproc import Completed, client_env, run
from tests.conftest import RunningBroker, require_tool, run_broker

pytestmark = pytest.mark.client

FIXED_IN = (576, 0, 0)  # from here on, only DNS failures are written to the disk cache
CACHE_MAX_AGE_SECONDS = 600
WAIT_SECONDS = 120.0


@contextlib.contextmanager
def reserved_ports(count: int) -> Iterator[list[int]]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
        yield [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def env_for(metadata_port: int, admin_port: int, config_dir: Path) -> dict[str, str]:
    """The app container's environment: fixed before the broker exists, as in a pod spec."""
    planned = RunningBroker(f"127.0.0.1:{metadata_port}", f"127.0.0.1:{admin_port}", asyncio.Event())
    env = client_env(planned, config_dir)
    env.update(
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
        CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
        # Other suites share the CPU: a slow first answer must not read as "not on GCE".
        CLOUDSDK_COMPUTE_GCE_METADATA_CHECK_TIMEOUT_SEC="20",
    )
    return env


def gcloud_version(gcloud: str) -> tuple[int, ...]:
    """The SDK version, from ``<sdk root>/VERSION`` or ``gcloud version`` (called before any broker runs)."""
    version_file = Path(gcloud).resolve().parent.parent / "VERSION"
    if version_file.is_file():
        text = version_file.read_text()
    else:
        text = subprocess.run(
            [gcloud, "version"], capture_output=True, text=True, timeout=120, check=False
        ).stdout
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    assert found, f"cannot read the gcloud version from {text!r}"
    return tuple(int(part) for part in found.groups())


def gce_cache(config_dir: Path) -> str | None:
    path = config_dir / "gce"
    return path.read_text() if path.exists() else None


async def print_access_token(gcloud: str, env: dict[str, str]) -> Completed:
    return await run(gcloud, "auth", "print-access-token", env=env, expect_ok=False)


async def test_gcloud_started_before_the_broker_is_locked_out(
    make_settings: Callable[..., settings.Settings], google: FakeGoogle, tmp_path: Path
) -> None:
    gcloud = require_tool("gcloud")
    pinned = gcloud_version(gcloud) < FIXED_IN
    config_dir = tmp_path / "gcloud"
    config_dir.mkdir()
    with reserved_ports(2) as (port, admin_port):
        env = env_for(port, admin_port, config_dir)

        early = await print_access_token(gcloud, env)  # nothing listens yet
        assert early.returncode != 0, early.describe()
        # Before 576 the refusal is written to disk; from 576 on it stays in memory.
        assert (gce_cache(config_dir) == "False") is pinned, early.describe()

        resolved = make_settings(listen=[f"127.0.0.1:{port}"], admin_listen=f"127.0.0.1:{admin_port}")
        async with run_broker(resolved) as running, aiohttp.ClientSession() as session:
            await wait_ready(session, running.admin_url, Probes())
            later = await print_access_token(gcloud, env)
            if not pinned:
                # gcloud >= 576 keeps a refused connection in memory only.
                assert later.returncode == 0, later.describe()
                return
            # The documented hazard: the broker is up and ready, gcloud still says "not on GCE".
            assert later.returncode != 0, later.describe()
            assert "active account" in later.stderr, later.describe()
            assert gce_cache(config_dir) == "False", later.describe()

            # The stale cache is the only cause: once it is 10 minutes old, the same config works.
            stale = (config_dir / "gce").stat().st_mtime - CACHE_MAX_AGE_SECONDS - 60
            os.utime(config_dir / "gce", (stale, stale))
            aged = await print_access_token(gcloud, env)
            assert aged.returncode == 0, aged.describe()
            assert aged.stdout.strip() in google.iam.issued_access, aged.describe()
            assert gce_cache(config_dir) == "True", aged.describe()


class Probes:
    """What the orchestrator's /readyz probes saw: a status, or ``None`` for a refused connection."""

    def __init__(self) -> None:
        self.seen: list[int | None] = []
        self.refused = asyncio.Event()
        self.not_ready = asyncio.Event()

    def add(self, status: int | None) -> None:
        self.seen.append(status)
        if status is None:
            self.refused.set()
        elif status != 200:
            self.not_ready.set()


async def wait_ready(session: aiohttp.ClientSession, admin_url: str, probes: Probes) -> None:
    """Poll /readyz like a startupProbe (k8s) or a HEALTHY dependency (ECS) until it is 200."""
    timeout = aiohttp.ClientTimeout(total=5)

    async def poll() -> None:
        while True:
            try:
                async with session.get(f"{admin_url}/readyz", timeout=timeout) as response:
                    probes.add(response.status)
                    if response.status == 200:
                        return
            except (aiohttp.ClientConnectionError, TimeoutError):
                probes.add(None)
            await asyncio.sleep(0.1)  # the probe period

    await asyncio.wait_for(poll(), WAIT_SECONDS)


async def wait_event(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), WAIT_SECONDS)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_app_started_on_readyz_gets_credentials(
    make_settings: Callable[..., settings.Settings], google: FakeGoogle, tmp_path: Path
) -> None:
    gcloud = require_tool("gcloud")
    config_dir = tmp_path / "gcloud"
    config_dir.mkdir()
    # Hold the first token exchange so the broker is listening but not ready for a while.
    google.sts.gate = asyncio.Event()
    probes = Probes()
    with reserved_ports(2) as (port, admin_port):
        env = env_for(port, admin_port, config_dir)
        admin_url = f"http://127.0.0.1:{admin_port}"

        async def orchestrator() -> Completed:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, admin_url, probes)
            return await print_access_token(gcloud, env)

        app = asyncio.create_task(orchestrator())
        try:
            await wait_event(probes.refused, "the orchestrator's first (refused) probe")
            resolved = make_settings(listen=[f"127.0.0.1:{port}"], admin_listen=f"127.0.0.1:{admin_port}")
            async with run_broker(resolved):
                await wait_event(probes.not_ready, "a not-ready answer from the listening broker")
                assert not app.done(), "the app started before the broker was ready"
                google.sts.gate.set()
                result = await app
        finally:
            if not app.done():
                app.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await app

    assert result.returncode == 0, result.describe()
    assert result.stdout.strip() in google.iam.issued_access, result.describe()
    assert gce_cache(config_dir) == "True", result.describe()
    assert probes.seen[0] is None, f"/readyz answers seen: {probes.seen}"
    assert probes.seen[-1] == 200, f"/readyz answers seen: {probes.seen}"

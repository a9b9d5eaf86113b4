"""Module-scoped real webhook processes against a strict fake API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.tls import make_test_ca
from tests.webhook import _pods
from tests.webhook._fakeapi import FakeApiServer
from tests.webhook._process import WebhookProcess


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeApiServer]:
    fake = FakeApiServer(tmp_path_factory.mktemp("apiserver")).start()
    fake.add("team-a", "app", {"iam.gke.io/gcp-service-account": _pods.SA_EMAIL})
    fake.add("team-a", "default")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def webhook_tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("webhook-tls")
    make_test_ca(directory)
    return directory


@pytest.fixture(scope="module")
def webhook(
    tmp_path_factory: pytest.TempPathFactory, apiserver: FakeApiServer, webhook_tls: Path
) -> Iterator[WebhookProcess]:
    tmp = tmp_path_factory.mktemp("webhook")
    process = WebhookProcess.annotated_default(
        tmp,
        apiserver.write_kubeconfig(tmp / "kubeconfig"),
        webhook_tls,
    )
    try:
        process.wait_ready()
        yield process
    finally:
        rc = process.stop()
    assert rc == 0, process.log()

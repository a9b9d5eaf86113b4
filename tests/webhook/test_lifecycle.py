"""The webhook process's life cycle and its link to the API server: logs, SIGTERM, trust."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from broker.webhook import kube
from tests.webhook import _pods
from tests.webhook._fakeapi import FakeApiServer
from tests.webhook._process import WebhookProcess


def test_debug_log_never_shows_the_api_token(
    tmp_path: Path, apiserver: FakeApiServer, webhook_tls: Path
) -> None:
    process = WebhookProcess.annotated_default(
        tmp_path,
        apiserver.write_kubeconfig(tmp_path / "kubeconfig"),
        webhook_tls,
        "--log-level=debug",
    )
    try:
        process.wait_ready()
        assert process.review(_pods.deployment_pod("app")).allowed
        assert not process.review(_pods.deployment_pod("app", hostNetwork=True)).allowed
    finally:
        assert process.stop() == 0
    log = process.log()
    assert '"outcome": "refused"' in log, "the refusal is logged, with its reason"
    assert apiserver.token not in log


def test_sigterm_turns_unready_but_keeps_answering_then_exits_0(
    tmp_path: Path, apiserver: FakeApiServer, webhook_tls: Path
) -> None:
    """With failurePolicy: Fail a closed port refuses pods: after SIGTERM the replica says
    503 on /readyz (the endpoints controller drops it) and answers reviews until the delay ends."""
    process = WebhookProcess.annotated_default(
        tmp_path,
        apiserver.write_kubeconfig(tmp_path / "kubeconfig"),
        webhook_tls,
        "--shutdown-delay=3",
    )
    process.wait_ready()
    process.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    deadline = began + 2
    while process.session.get(process.admin_url + "/readyz", timeout=2).status_code != 503:
        assert time.monotonic() < deadline, "still ready after SIGTERM"
        time.sleep(0.05)
    assert process.review(_pods.deployment_pod("app")).allowed, "reviews are still answered"
    assert process.proc.wait(15) == 0
    assert 2.5 <= time.monotonic() - began <= 12
    process.stop()


def test_wrong_bearer_token_is_a_refusal_naming_rbac(
    tmp_path: Path, apiserver: FakeApiServer, webhook_tls: Path
) -> None:
    """The fake API server is strict: a token it does not know is a 401 Status, which the
    webhook reports as a refusal (never as an admission without injection)."""
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig")
    kubeconfig.write_text(kubeconfig.read_text().replace(apiserver.token, "not-the-token"))
    process = WebhookProcess.annotated_default(
        tmp_path,
        kubeconfig,
        webhook_tls,
    )
    try:
        process.wait_ready()
        answer = process.review(_pods.deployment_pod("app"))
        assert not answer.allowed
        assert "HTTP 401" in answer.message
        assert process.metrics()['wif_broker_webhook_serviceaccount_reads_total{outcome="forbidden"}'] == 1
    finally:
        assert process.stop() == 0


def test_api_server_certificate_is_verified(
    tmp_path: Path, apiserver: FakeApiServer, webhook_tls: Path
) -> None:
    """A kubeconfig trusting another CA: the TLS handshake fails and the pod is refused."""
    kubeconfig = apiserver.write_kubeconfig(tmp_path / "kubeconfig")
    kubeconfig.write_text(kubeconfig.read_text().replace(str(apiserver.ca_file), str(webhook_tls / "ca.pem")))
    process = WebhookProcess.annotated_default(
        tmp_path,
        kubeconfig,
        webhook_tls,
    )
    try:
        process.wait_ready()
        answer = process.review(_pods.deployment_pod("app"))
        assert not answer.allowed
        assert "cannot reach the API server" in answer.message
    finally:
        assert process.stop() == 0


async def test_api_client_does_not_reread_proxy_env_and_netrc_per_request(
    tmp_path: Path, apiserver: FakeApiServer
) -> None:
    """aiohttp's trust_env re-reads the proxy variables and ~/.netrc (on a thread) for every
    request: over 1 ms of CPU per review (bench/webhook.py). The reader turns it off; this
    fails if a client-library or aiohttp upgrade brings it back."""
    reader = await kube.ServiceAccountReader.open(
        {"KUBECONFIG": str(apiserver.write_kubeconfig(tmp_path / "kc"))}
    )
    try:
        session = reader._api.rest_client.pool_manager
        assert session.trust_env is False
        assert session.connector is not None
        assert session.connector.limit == kube.MAX_CONNECTIONS
        account = await reader.read("team-a", "app")
        assert account.annotations == {"iam.gke.io/gcp-service-account": _pods.SA_EMAIL}
    finally:
        await reader.close()

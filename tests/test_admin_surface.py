"""SPEC §2/§8: the admin listener is loopback by default and says as little as it can."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from broker import settings
from broker.fakes import DEFAULT_AUDIENCE, DEFAULT_SERVICE_ACCOUNT, FakeGoogle
from tests.conftest import run_broker
from tests.resilience._support import eventually, write_settings


def test_admin_listen_defaults_to_loopback(tmp_path: Path) -> None:
    cred = tmp_path / "credentials.json"
    info = {
        "type": "external_account",
        "audience": DEFAULT_AUDIENCE,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "credential_source": {"file": "/dev/null"},
    }
    cred.write_text(json.dumps(info))
    resolved = settings.build({"credentials": str(cred), "project_id": "p-123456"}, environ={})
    assert resolved.admin_listen == settings.Address("127.0.0.1", 8989)


async def test_no_server_header_naming_python_or_aiohttp(tmp_path: Path) -> None:
    async with (
        FakeGoogle() as google,
        run_broker(write_settings(tmp_path, google)) as broker,
        aiohttp.ClientSession() as session,
    ):
        for path in ("/healthz", "/readyz", "/metrics", "/nothing-here"):
            async with session.get(broker.admin_url + path) as resp:
                server = resp.headers.get("Server", "")
                assert "python" not in server.lower(), (path, server)
                assert "aiohttp" not in server.lower(), (path, server)


async def test_a_failing_readyz_names_the_step_and_class_only(tmp_path: Path) -> None:
    # IAM denies (unknown service account): the full error carries the email, the
    # project number and the pool in its fix; the readiness body must not.
    async with FakeGoogle() as google:
        google.iam.service_accounts.clear()
        async with run_broker(write_settings(tmp_path, google)) as broker, aiohttp.ClientSession() as session:
            seen: dict[str, object] = {}

            async def failed() -> bool:
                async with session.get(broker.admin_url + "/readyz") as resp:
                    seen.update(status=resp.status, body=await resp.text())
                return "failed" in str(seen["body"])

            await eventually(failed, "the pre-warm never failed")
    body = str(seen["body"])
    assert seen["status"] == 503
    assert "iam_generate_access_token failed (Denied, HTTP 403" in body, body
    for secretish in (DEFAULT_SERVICE_ACCOUNT, "123456789012", "wif-broker-demo", "principalSet", "gcloud"):
        assert secretish not in body, (secretish, body)

"""Shared by the Azure tests: credential files, the broker's settings, clients, and what was seen.

The credential files are the shipped examples (``config/azure/``) with only the
Google URLs and the IMDS host pointed at the fakes, so the tests exercise the
files as operators copy them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from broker import metrics, settings
from broker.fakes import FakeGoogle
from tests.aws._harness import GOOGLE_AUTH_SCRIPT, ClientTokens, RecordCatcher
from tests.clients._subproc import client_env, run
from tests.conftest import RunningBroker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "config" / "azure"
VM_CREDENTIALS = EXAMPLES / "credentials-azure-vm.json"
IDENTITY_CREDENTIALS = EXAMPLES / "credentials-azure-identity.json"
AKS_TOKEN_CREDENTIALS = EXAMPLES / "credentials-aks-token.json"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
REAL_IMDS = "http://169.254.169.254"
PLACEHOLDERS = {"PROJECT_NUMBER": "123456789012", "PROJECT_ID": "my-project", "POOL": "p", "PROVIDER": "x"}


def example(path: Path, google: FakeGoogle, imds_base: str = "") -> dict[str, Any]:
    """A shipped credential file, its Google URLs (and IMDS host) pointed at the fakes."""
    info: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    info["audience"] = google.audience
    info["token_url"] = google.token_url
    info["service_account_impersonation_url"] = google.impersonation_url()
    source = info["credential_source"]
    if imds_base and "url" in source:
        source["url"] = source["url"].replace(REAL_IMDS, imds_base)
    return info


def write(tmp_path: Path, info: dict[str, Any], name: str = "credentials.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(info), encoding="utf-8")
    return path


def broker_settings(**flags: Any) -> settings.Settings:
    merged: dict[str, Any] = {
        "listen": ["127.0.0.1:0"],
        "admin_listen": "127.0.0.1:0",
        "zone": "us-central1-a",
    }
    merged.update(flags)
    return settings.build(merged, environ={})


def azure_calls(outcome: str = "ok") -> float:
    value = metrics.REGISTRY.get_sample_value(
        "wif_broker_upstream_requests_total", {"upstream": "azure", "outcome": outcome}
    )
    return value or 0.0


def azure_latency_observations() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "wif_broker_upstream_request_duration_seconds_count", {"upstream": "azure"}
    )
    return value or 0.0


async def identity(logs: RecordCatcher) -> dict[str, str]:
    """Every field of the daemon's one-off 'native identity' line (or its error)."""
    async with asyncio.timeout(30):
        while True:
            for record in logs.records:
                if getattr(record, "event", None) == "identity":
                    skip = set(vars(record)) - set(vars(_BLANK))
                    return {k: str(getattr(record, k)) for k in sorted(skip) if k not in ("event",)}
            await asyncio.sleep(0.05)


_BLANK = logging.LogRecord("x", logging.INFO, "", 0, "", None, None)


def app_env(broker: RunningBroker, config_dir: Path) -> dict[str, str]:
    """What an app gets: the broker's env bundle; no Azure identity, no test CA, no AWS."""
    env = {
        k: v
        for k, v in client_env(broker, config_dir).items()
        if not k.startswith(("AZURE_", "AWS_")) and k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    }
    env.update(
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
        CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
    )
    return env


async def real_clients(broker: RunningBroker, workdir: Path, gcloud: str) -> ClientTokens:
    """``gcloud auth print-access-token`` and google-auth ``default()`` + ``refresh()``, concurrently."""
    env = app_env(broker, Path(tempfile.mkdtemp(prefix="gcloud-", dir=workdir)))
    first, second = await asyncio.gather(
        run(gcloud, "auth", "print-access-token", env=env, expect_ok=False),
        run(sys.executable, "-c", GOOGLE_AUTH_SCRIPT, env=env, expect_ok=False),
    )
    return ClientTokens(first, second)


async def token_response(broker: RunningBroker) -> tuple[int, str]:
    """What the broker's token endpoint answers a client (status, body)."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(broker.url + TOKEN_PATH, headers={"Metadata-Flavor": "Google"}) as resp,
    ):
        return resp.status, await resp.text()


def assert_clients_got_iam_tokens(clients: ClientTokens, google: FakeGoogle) -> None:
    assert clients.gcloud.returncode == 0, clients.describe()
    assert clients.gcloud_token in google.iam.issued_access, clients.describe()
    assert clients.google_auth.returncode == 0, clients.describe()
    assert clients.google_auth_token in google.iam.issued_access, clients.describe()

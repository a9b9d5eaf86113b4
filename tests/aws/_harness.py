"""Shared by the AWS end-to-end tests and the network-namespace ECS scenario script.

Builds the aws1 credential file (as ``gcloud … create-cred-config --aws
--enable-imdsv2`` writes it, with the Google URLs pointing at FakeGoogle), runs
the two real clients (gcloud, google-auth) against a running broker with no AWS
variables in their environment, and reads back what the fakes and the broker
saw: STS subjects, the signing key, the botocore provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from broker import metrics, settings
from broker.fakes import FakeGoogle
from tests.clients._subproc import Completed, client_env, run
from tests.conftest import RunningBroker, run_broker
from tests.fakes.aws import AWS4_REQUEST_TYPE, FakeAws, SignedRequest, parse_aws_subject_token

TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
VERIFICATION_URL = "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
IRSA_SESSION = re.compile(r"^arn:aws:sts::\d{12}:assumed-role/wif-broker-role/botocore-session-\d+$")
ZONE = "us-central1-a"

GOOGLE_AUTH_SCRIPT = """
import json
import google.auth
from google.auth import compute_engine
from google.auth.transport.requests import Request

creds, project = google.auth.default()
creds.refresh(Request())
print(json.dumps({
    "compute_engine": type(creds) is compute_engine.Credentials,
    "project": project,
    "token": creds.token,
}))
"""


def credential_info(google: FakeGoogle, metadata_base: str) -> dict[str, Any]:
    """An aws1 file as gcloud writes it with --enable-imdsv2; IMDS URLs at ``metadata_base``."""
    return {
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": google.audience,
        "subject_token_type": AWS4_REQUEST_TYPE,
        "token_url": google.token_url,
        "credential_source": {
            "environment_id": "aws1",
            "region_url": metadata_base + "latest/meta-data/placement/availability-zone",
            "url": metadata_base + "latest/meta-data/iam/security-credentials",
            "regional_cred_verification_url": VERIFICATION_URL,
            "imdsv2_session_token_url": metadata_base + "latest/api/token",
        },
        "service_account_impersonation_url": google.impersonation_url(),
    }


def broker_settings(cred_file: Path, **flags: Any) -> settings.Settings:
    merged: dict[str, Any] = {
        "credentials": str(cred_file),
        "listen": ["127.0.0.1:0"],
        "admin_listen": "127.0.0.1:0",
        "zone": ZONE,
    }
    merged.update(flags)
    return settings.build(merged, environ={})


def principal_set(google: FakeGoogle, role_arn_prefix: str) -> str:
    pool = google.audience.removeprefix("//").split("/providers/")[0]
    return f"principalSet://{pool}/attribute.aws_role/{role_arn_prefix}"


def provider_method() -> str | None:
    """The botocore method ``wif_broker_aws_credential_provider`` reports as 1 (None if none)."""
    for family in metrics.REGISTRY.collect():
        if family.name == "wif_broker_aws_credential_provider":
            live = [s.labels["method"] for s in family.samples if s.value == 1]
            return live[0] if len(live) == 1 else None
    return None


def upstream_aws_calls(outcome: str = "ok") -> float:
    value = metrics.REGISTRY.get_sample_value(
        "wif_broker_upstream_requests_total", {"upstream": "aws", "outcome": outcome}
    )
    return value or 0.0


def aws_latency_observations() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "wif_broker_upstream_request_duration_seconds_count", {"upstream": "aws"}
    )
    return value or 0.0


def signed_requests(google: FakeGoogle) -> list[SignedRequest]:
    """Every AWS subject token the broker sent to (fake) Google STS, parsed."""
    found = []
    for call in google.sts.calls:
        form = call.form or {}
        if form.get("subject_token_type") == AWS4_REQUEST_TYPE:
            found.append(parse_aws_subject_token(form["subject_token"]))
    return found


class RecordCatcher(logging.Handler):
    """Keeps the broker's log records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> RecordCatcher:
        logger = logging.getLogger("broker")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("broker")
        logger.removeHandler(self)
        logger.setLevel(self._level)


def aws_free_client_env(broker: RunningBroker, config_dir: Path) -> dict[str, str]:
    """What an app container gets: the broker's env bundle, and no AWS credentials at all."""
    env = {k: v for k, v in client_env(broker, config_dir).items() if not k.startswith("AWS_")}
    env.update(
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
        CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
    )
    return env


@dataclass(frozen=True)
class ClientTokens:
    gcloud: Completed
    google_auth: Completed

    @property
    def gcloud_token(self) -> str:
        return self.gcloud.stdout.strip()

    @property
    def google_auth_token(self) -> str:
        try:
            return str(json.loads(self.google_auth.stdout)["token"])
        except (ValueError, KeyError, TypeError):
            return ""

    def describe(self) -> str:
        return self.gcloud.describe() + self.google_auth.describe()


def gcloud_path() -> str | None:
    return shutil.which("gcloud")


async def real_clients(broker: RunningBroker, workdir: Path, gcloud: str) -> ClientTokens:
    """``gcloud auth print-access-token`` and google-auth ``default()`` + ``refresh()``, concurrently."""
    gcloud_dir = Path(tempfile.mkdtemp(prefix="gcloud-", dir=workdir))  # fresh: gcloud caches "on GCE?"
    env = aws_free_client_env(broker, gcloud_dir)
    assert not any(k.startswith("AWS_") for k in env)
    first, second = await asyncio.gather(
        run(gcloud, "auth", "print-access-token", env=env, expect_ok=False),
        run(sys.executable, "-c", GOOGLE_AUTH_SCRIPT, env=env, expect_ok=False),
    )
    return ClientTokens(first, second)


def clear_aws_env() -> None:
    """For the scenario script (a process of its own): no inherited AWS settings."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            del os.environ[key]


async def token_response(broker: RunningBroker) -> tuple[int, str]:
    """What the broker's token endpoint answers a client (status, body)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(broker.url + TOKEN_PATH, headers={"Metadata-Flavor": "Google"}) as resp,
    ):
        return resp.status, await resp.text()


def caller_identity_calls(aws: FakeAws) -> list[Any]:
    """GetCallerIdentity requests FakeAwsSts received: botocore's own STS client asking
    who it is (what ``check`` does). The signed request Google STS replays never reaches
    FakeAwsSts: FakeGoogle's STS verifies it with the account's secrets itself."""
    return [c for c in aws.sts.calls if (c.form or {}).get("Action") == "GetCallerIdentity"]


@contextlib.asynccontextmanager
async def described_broker(
    resolved: settings.Settings, **kwargs: Any
) -> AsyncIterator[tuple[RunningBroker, RecordCatcher]]:
    """``run_broker`` with the broker's log records caught.

    ``run`` no longer describes the native identity (SPEC §8: GetCallerIdentity is
    egress the chain does not need; ``check`` does it), so there is no line to wait for.
    """
    with RecordCatcher() as logs:
        async with run_broker(resolved, **kwargs) as broker:
            yield broker, logs

"""Subject-token sources failing under a running broker: a rotating token file, dead credential endpoints.

The token file is laid out as the kubelet lays out a projected volume
(``token -> ..data/token``, ``..data`` swapped atomically); the AWS and Azure
cases stop the credential endpoint (ECS container endpoint, Azure IMDS) under
a warm broker.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from broker import settings
from broker.clock import ManualClock
from broker.fakes import FakeGoogle
from tests.aws._harness import credential_info as aws_credential_info
from tests.aws._harness import described_broker
from tests.aws.conftest import loopback_only  # noqa: F401 - autouse: AWS code must stay on loopback
from tests.fakes.aws import ISOLATED_ENV, FakeAws, FakeAwsAccount, accept_aws
from tests.fakes.azure import DEFAULT_APP, FakeAzure
from tests.resilience._support import (
    LIFETIME,
    MIN_SERVE_TTL,
    POLICY_BACKOFF_CAP,
    WAIT,
    eventually,
    kubelet_rotate,
    kubelet_token_dir,
    ready_broker,
    step_until,
    token,
    upstream_calls,
    write_settings,
)

ROTATED = "system:serviceaccount:default:rotated"


def subjects(google: FakeGoogle) -> list[str]:
    return [c.form["subject_token"] for c in google.sts.calls if c.form]


async def test_token_file_missing_during_refresh_then_rotated(tmp_path: Path) -> None:
    """The projected token disappears (``..data`` removed) before the federated token's
    refresh: refreshes fail on the subject-token step while clients keep getting the cached
    access token. The kubelet then writes a rotated token: the next exchange sends it, and
    a later rotation is picked up by the exchange after that (the file is read per exchange)."""
    clock = ManualClock()
    async with FakeGoogle(now=clock.wall) as google:
        volume = tmp_path / "projected"
        path = kubelet_token_dir(volume, google.subject_token(lifetime_seconds=7200))
        resolved = write_settings(tmp_path, google, path)
        async with ready_broker(resolved, clock=clock) as broker:
            start = clock.wall()
            first = await token(broker.url)
            assert first.status == 200, first.text
            failed_reads = upstream_calls("subject_token", "transient")
            (volume / "..data").unlink()
            while clock.wall() - start < LIFETIME - 600:  # past every jittered refresh time
                await clock.advance(20)
                answer = await token(broker.url)
                assert answer.status == 200, answer.text
                assert answer.expires_in > MIN_SERVE_TTL
            assert upstream_calls("subject_token", "transient") > failed_reads
            assert len(google.sts.calls) == 1, "no exchange without a subject token"

            second = google.subject_token(subject=ROTATED, lifetime_seconds=7200)
            kubelet_rotate(volume, second, version=1)

            async def exchanged() -> bool:
                # A real round trip per step (step_until's contract): a retry that the step
                # woke gets the event-loop time to reach the fake before the next step.
                answer = await token(broker.url)
                assert answer.status == 200, answer.text
                return len(google.sts.calls) == 2

            await step_until(clock, 1, exchanged, limit=POLICY_BACKOFF_CAP + 10)
            assert subjects(google)[-1] == second

            third = google.subject_token(subject=ROTATED + "-again", lifetime_seconds=7200)
            kubelet_rotate(volume, third, version=2)

            async def exchanged_again() -> bool:
                answer = await token(broker.url)
                assert answer.status == 200, answer.text
                return len(google.sts.calls) == 3

            await step_until(clock, 20, exchanged_again, limit=LIFETIME)
            assert subjects(google)[-1] == third
            assert all(issued.subject.startswith(ROTATED) for issued in list(google.sts.issued.values())[1:])


async def test_aws_container_endpoint_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct access with an aws1 credential file, AWS keys from the container endpoint
    (ECS task role). The endpoint hands out keys that are always due for refresh, so every
    exchange asks it again. With the endpoint stopped, the cached token is still served,
    and a request that needs a new exchange gets 503 naming step ``aws``, never a 500."""
    async with FakeGoogle() as google, FakeAws(FakeAwsAccount(lifetime_seconds=300)) as aws:
        accept_aws(google.sts, aws.account)
        for key, value in {**ISOLATED_ENV, **aws.container_env(), "AWS_REGION": "us-east-2"}.items():
            monkeypatch.setenv(key, value)
        info = aws_credential_info(google, aws.imds_url)
        del info["service_account_impersonation_url"]
        cred = tmp_path / "credentials.json"
        cred.write_text(json.dumps(info))
        resolved = settings.build(
            {
                "credentials": str(cred),
                "project_id": "wif-broker-demo",
                "listen": ["127.0.0.1:0"],
                "admin_listen": "127.0.0.1:0",
            },
            environ={},
        )
        async with described_broker(resolved) as (broker, _):
            warm = await token(broker.url)
            assert warm.status == 200, warm.text
            fetched = len(aws.container.calls)
            assert fetched >= 1
            await aws.close()  # the container endpoint (and FakeAws's IMDS and STS) stop answering

            cached = await token(broker.url)
            assert cached.status == 200, cached.text
            assert cached.access_token == warm.access_token
            fresh = await token(broker.url, scopes="https://www.googleapis.com/auth/bigquery")
            assert fresh.status == 503, fresh.text
            assert fresh.text.startswith("aws failed"), fresh.text
            assert len(google.sts.calls) == 1


ENTRA_TOKEN_LIFETIME = 4  # seconds: the fake IMDS's Entra tokens expire almost at once


async def test_azure_imds_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File-less ``source = azure`` with a managed identity (FakeAzure's IMDS), direct access.
    azure-identity caches the Entra token and keeps using it while it is valid even when a
    refresh fails, so the fake IMDS mints tokens that live a few seconds. With IMDS stopped,
    the cached Google token is still served; once the Entra token has expired, a request that
    needs a new exchange gets 503 naming step ``azure``, never a 500."""
    async with FakeGoogle() as google, FakeAzure() as azure:
        azure.imds.lifetime_seconds = ENTRA_TOKEN_LIFETIME
        azure.google_provider(google.sts)
        for key, value in azure.managed_identity_env().items():
            monkeypatch.setenv(key, value)
        resolved = settings.build(
            {
                "audience": google.audience,
                "source": "azure",
                "azure_resource": DEFAULT_APP.app_id_uri,
                "token_url": google.token_url,
                "project_id": "wif-broker-demo",
                "listen": ["127.0.0.1:0"],
                "admin_listen": "127.0.0.1:0",
            },
            environ={},
        )
        async with described_broker(resolved) as (broker, _):
            warm = await token(broker.url)
            assert warm.status == 200, warm.text
            assert azure.imds.calls
            await azure.close()  # IMDS (and the fake Entra ID) stop answering
            scopes = iter(range(1_000))

            async def refused() -> bool:
                cached = await token(broker.url)
                assert cached.status == 200, cached.text
                assert cached.access_token == warm.access_token
                fresh = await token(broker.url, scopes=f"https://www.googleapis.com/auth/s{next(scopes)}")
                assert fresh.status in (200, 503), fresh.text
                if fresh.status == 200:  # azure-identity's Entra token still valid: wait it out
                    await asyncio.sleep(0.5)
                    return False
                assert fresh.text.startswith("azure failed"), fresh.text
                return True

            await eventually(refused, "no exchange failed after the Entra token expired", within=WAIT)

"""/metrics scraped with prometheus-client's parser; values move as the scenario says."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from broker import metrics, settings
from broker.clock import ManualClock
from broker.fakes import FakeGoogle
from tests.conftest import run_broker

MF = {"Metadata-Flavor": "Google"}
TOKEN = "/computeMetadata/v1/instance/service-accounts/default/token"


async def scrape(admin_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def fetch(url: str, **params: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, headers=MF, params=params) as resp:
        await resp.read()
        return resp.status


async def test_metrics_follow_a_cold_request_a_hit_and_a_failure(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    async with run_broker(make_settings()) as broker:
        for _ in range(100):  # let the pre-warm finish so it is not counted below
            if await ready(broker.admin_url) == 200:
                break
            await asyncio.sleep(0.02)
        before = await scrape(broker.admin_url)
        scopes = "https://www.googleapis.com/auth/metrics-test"
        assert await fetch(broker.url + TOKEN, scopes=scopes) == 200  # cold: miss, one IAM call
        assert await fetch(broker.url + TOKEN, scopes=scopes) == 200  # hit
        google.iam.fail_next(503, {"error": {"code": 503, "message": "backend", "status": "UNAVAILABLE"}})
        assert await fetch(broker.url + TOKEN, scopes=scopes + "-2") == 503  # injected failure
        after = await scrape(broker.admin_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("wif_broker_cache_lookups_total", kind="access", result="miss") == 2
    assert delta("wif_broker_cache_lookups_total", kind="access", result="hit") == 1
    assert delta("wif_broker_upstream_requests_total", upstream="iam", outcome="ok") == 1
    assert delta("wif_broker_upstream_requests_total", upstream="iam", outcome="transient") == 1
    assert delta("wif_broker_upstream_request_duration_seconds_count", upstream="iam") == 2
    assert delta("wif_broker_requests_total", endpoint="token", status="2xx") == 2
    assert delta("wif_broker_requests_total", endpoint="token", status="5xx") == 1
    expiry = value(after, "wif_broker_token_expiry_seconds", kind="access")
    assert 3000 < expiry <= 3600
    assert value(after, "wif_broker_token_expiry_seconds", kind="federated") > 3000
    assert value(after, "wif_broker_build_info", version="0.1.0") == 1
    assert value(after, "process_resident_memory_bytes") > 0
    # No request data in labels: only the pre-created enum values appear.
    for name, labels in after:
        if name.startswith("wif_broker_"):
            for key, label in labels:
                assert "googleapis.com/auth" not in label, (name, key)
                assert "@" not in label, (name, key)


async def test_readiness_latches_through_an_outage_until_nothing_retries(
    tmp_path: Path, make_settings: Callable[..., settings.Settings]
) -> None:
    clock = ManualClock(start=1_900_000_000.0)
    async with FakeGoogle(now=clock.wall) as google:
        token_file = tmp_path / "token-clocked"
        token_file.write_text(google.subject_token())
        cred = tmp_path / "c2.json"
        import json

        from tests.conftest import credential_info

        cred.write_text(json.dumps(credential_info(google, token_file)))
        resolved = make_settings(credentials=str(cred))
        async with run_broker(resolved, clock=clock) as broker:
            for _ in range(200):
                if await ready(broker.admin_url) == 200:
                    break
                await clock.advance(0)
            assert await ready(broker.admin_url) == 200
            google.sts.fail_next(503, {"error": "unavailable", "error_description": "down"}, count=10_000)
            google.iam.fail_next(
                503, {"error": {"code": 503, "message": "down", "status": "UNAVAILABLE"}}, 10_000
            )
            await clock.advance(3600 - 310)  # refreshes fail, the old token is still servable
            assert await ready(broker.admin_url) == 200
            assert await fetch(broker.url + TOKEN) == 200
            await clock.advance(20)  # now under min-serve-ttl: nothing servable is left
            # SPEC §8: ready stays latched while the refresh retries; the outage shows in a
            # metric (and a log line) instead of a failed probe that restarts the sidecar.
            assert await ready(broker.admin_url) == 200
            assert await fetch(broker.url + TOKEN) == 503
            assert metrics.REGISTRY.get_sample_value("wif_broker_default_token_servable") == 0
            # A denial evicts the token and ends the retries: nothing servable, nothing retrying.
            google.sts.recover()
            google.iam.recover()
            google.iam.service_accounts.clear()
            for _ in range(40):
                if await ready(broker.admin_url) == 503:
                    break
                await clock.advance(30)
            assert await ready(broker.admin_url) == 503


async def ready(admin_url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/readyz") as resp:
        return resp.status

"""Bounded work per caller (SPEC §8): capped caches, one upstream budget, audience limits.

The production daemon against the strict fakes over real sockets. The clock is a
ManualClock shared with the fakes, so the token bucket refills only when a test
moves time: what the fakes received is then an exact function of the requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker import metrics, settings
from broker.clock import ManualClock
from broker.fakes import FakeGoogle
from tests.conftest import RunningBroker, run_broker
from tests.resilience._support import IAM_503, until_ready, write_settings

MF = {"Metadata-Flavor": "Google"}
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"


def id_calls(google: FakeGoogle) -> int:
    return sum(1 for c in google.iam.calls if c.path.endswith(":generateIdToken"))


def access_calls(google: FakeGoogle) -> int:
    return sum(1 for c in google.iam.calls if c.path.endswith(":generateAccessToken"))


def evictions(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("wif_broker_cache_evictions_total", {"kind": kind}) or 0.0


async def fetch(
    session: aiohttp.ClientSession, url: str, params: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    async with session.get(url, headers=MF, params=params) as resp:
        return resp.status, await resp.text(), dict(resp.headers)


class Broker:
    def __init__(self, running: RunningBroker, google: FakeGoogle, clock: ManualClock) -> None:
        self.running, self.google, self.clock = running, google, clock
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def identity(self, audience: str) -> tuple[int, str, dict[str, str]]:
        return await fetch(self.session, self.running.url + IDENTITY_PATH, {"audience": audience})

    async def token(self, scopes: str | None = None) -> tuple[int, str, dict[str, str]]:
        params = {"scopes": scopes} if scopes else None
        return await fetch(self.session, self.running.url + TOKEN_PATH, params)


@pytest.fixture
async def make_broker(tmp_path: Path) -> AsyncIterator[Any]:
    stack: list[Any] = []

    async def start(**flags: Any) -> Broker:
        clock = ManualClock()
        google = await FakeGoogle(now=clock.wall).__aenter__()
        stack.append(google)
        resolved: settings.Settings = write_settings(tmp_path, google, **flags)
        cm = run_broker(resolved, clock=clock)
        running = await cm.__aenter__()
        stack.append(cm)
        await until_ready(running)
        broker = Broker(running, google, clock)
        stack.append(broker.session)
        return broker

    yield start
    for item in reversed(stack):
        if isinstance(item, aiohttp.ClientSession):
            await item.close()
        else:
            await item.__aexit__(None, None, None)


async def test_distinct_audiences_beyond_the_budget_get_429_and_call_nothing(make_broker: Any) -> None:
    broker: Broker = await make_broker(upstream_rate=5)  # burst 10
    answers = await asyncio.gather(*(broker.identity(f"https://aud{i}.example") for i in range(30)))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 20, statuses
    assert id_calls(broker.google) == 10
    for status, text, headers in answers:
        if status == 429:
            assert headers["Metadata-Flavor"] == "Google"
            assert headers["Retry-After"].isdigit()
            assert int(headers["Retry-After"]) >= 1
            assert "upstream-rate" in text
    # Scope sets draw from the same budget: a new one is refused too, and calls nothing.
    before = access_calls(broker.google)
    status, _, headers = await broker.token("https://www.googleapis.com/auth/devstorage.read_only")
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert access_calls(broker.google) == before
    # The default scope set is never starved (cached, and exempt from the bucket).
    assert (await broker.token())[0] == 200
    # Cached audiences are still served while the bucket is empty: a hit costs nothing.
    served = next(i for i, (status, _, _) in enumerate(answers) if status == 200)
    assert (await broker.identity(f"https://aud{served}.example"))[0] == 200
    assert id_calls(broker.google) == 10
    # One second refills rate (5) tokens.
    await broker.clock.advance(1)
    more = await asyncio.gather(*(broker.identity(f"https://later{i}.example") for i in range(8)))
    assert [s for s, _, _ in more].count(200) == 5
    assert id_calls(broker.google) == 15


async def test_a_closed_loop_of_refused_requests_is_paced(make_broker: Any) -> None:
    """A caller that asks again as soon as it is answered (what a flood of distinct audiences
    does) gets each 429 after a 0.5-1 s pause (listener.pace_refusal), so 4 such clients make
    a few requests a second, not thousands; the default token is served at once meanwhile.
    The bucket never refills here (the ManualClock stands still); the pause is real time."""
    broker: Broker = await make_broker(upstream_rate=1)  # burst 2
    sent: list[tuple[int, float]] = []  # (status, seconds until answered)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0

    async def closed_loop(worker: int) -> None:
        i = 0
        while loop.time() < deadline:
            began = loop.time()
            status, _, headers = await broker.identity(f"https://flood-{worker}-{i}.example")
            sent.append((status, loop.time() - began))
            if status == 429:
                assert int(headers["Retry-After"]) >= 1
            i += 1

    flood = asyncio.gather(*(closed_loop(w) for w in range(4)))
    await asyncio.sleep(0.2)  # the flood is in its pauses now
    began = loop.time()
    assert (await broker.token())[0] == 200  # a cache hit is not paced
    hit_seconds = loop.time() - began
    await flood
    statuses = [status for status, _ in sent]
    assert statuses.count(200) == 2, statuses
    assert id_calls(broker.google) == 2
    # Each worker: at most 2 s / 0.5 s + 1 answers (plus the burst's two 200s).
    assert statuses.count(429) <= 4 * 5, len(statuses)
    assert all(seconds >= 0.5 for status, seconds in sent if status == 429), sent
    assert hit_seconds < 0.5, hit_seconds


async def test_denied_audiences_are_charged_and_stay_inside_the_cap(make_broker: Any) -> None:
    broker: Broker = await make_broker(max_audiences=4, upstream_rate=1000)
    broker.google.iam.service_accounts.clear()  # every generateIdToken is now 403
    before = evictions("id")
    for i in range(12):
        status, _, _ = await broker.identity(f"https://denied{i}.example")
        assert status == 403
    assert id_calls(broker.google) == 12
    assert evictions("id") - before == 8  # 12 failed keys, 4 kept


async def test_failed_transient_keys_are_evicted_too(make_broker: Any) -> None:
    broker: Broker = await make_broker(max_audiences=3, upstream_rate=1000)
    broker.google.iam.fail_next(503, IAM_503, count=10)
    before = evictions("id")
    for i in range(10):
        status, _, headers = await broker.identity(f"https://down{i}.example")
        assert status == 503
        assert headers["Retry-After"] == "1"
    assert evictions("id") - before == 7


async def test_lru_eviction_of_audiences_and_scope_sets(make_broker: Any) -> None:
    broker: Broker = await make_broker(max_audiences=4, max_scope_sets=3, upstream_rate=1000)
    before = evictions("id")
    for i in range(4):
        assert (await broker.identity(f"https://a{i}.example"))[0] == 200
    assert (await broker.identity("https://a0.example"))[0] == 200  # a0 is now the most recent
    assert (await broker.identity("https://a4.example"))[0] == 200  # evicts a1, the least recent
    assert evictions("id") - before == 1
    calls = id_calls(broker.google)
    assert (await broker.identity("https://a0.example"))[0] == 200
    assert id_calls(broker.google) == calls  # still cached
    assert (await broker.identity("https://a1.example"))[0] == 200
    assert id_calls(broker.google) == calls + 1  # evicted: loaded again

    before_access = evictions("access")
    scope = "https://www.googleapis.com/auth/s{}"
    for i in range(4):
        assert (await broker.token(scope.format(i)))[0] == 200
    # The cap counts the pre-warmed default set, which is never evicted: 3 keys kept.
    assert evictions("access") - before_access == 2
    assert (await broker.token())[0] == 200
    calls = access_calls(broker.google)
    assert (await broker.token())[0] == 200
    assert access_calls(broker.google) == calls


@pytest.mark.parametrize(
    ("audience", "status"),
    [
        ("a" * 1024, 200),
        ("a" * 1025, 400),
        ("é" * 512, 200),  # 1,024 bytes in UTF-8
        ("é" * 513, 400),  # 513 characters, 1,026 bytes
        ("https://x.example/\t", 400),
        ("https://x.example/\x00", 400),
        ("https://x.example/\x1f", 400),
        ("https://x.example/\x7f", 400),
        ("https://x.example/\n", 400),
    ],
)
async def test_audience_length_and_control_characters(make_broker: Any, audience: str, status: int) -> None:
    broker: Broker = await make_broker()
    calls = id_calls(broker.google)
    got, text, headers = await broker.identity(audience)
    assert got == status, text
    assert headers["Metadata-Flavor"] == "Google"
    assert id_calls(broker.google) == calls + (1 if status == 200 else 0)

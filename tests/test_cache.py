"""TokenCache semantics under a driven clock (SPEC §4).

The loader is a small fake upstream (counts calls, can block or fail); the
clock is the only other thing the tests control.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from broker import metrics
from broker.cache import Policy, TokenBucket, TokenCache
from broker.clock import ManualClock
from broker.errors import BrokerError, Denied, RateLimited, Step, Transient
from broker.tokens import ScopeSet, Token, TokenKind

LIFETIME = 3600
POLICY = Policy(refresh_before=600, min_serve_ttl=300, jitter_fraction=0.1, backoff_base=1, backoff_cap=30)


class Upstream:
    """A loader that mints numbered tokens, optionally gated or failing."""

    def __init__(self, clock: ManualClock, lifetime: float = LIFETIME) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls: list[object] = []
        self.times: list[float] = []  # when each call was made
        self.gate: asyncio.Event | None = None
        self.fail_with: BrokerError | None = None

    async def __call__(self, key: object) -> Token:
        self.calls.append(key)
        self.times.append(self.clock.wall())
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return Token(TokenKind.ACCESS, f"token-{len(self.calls)}", self.clock.wall() + self.lifetime)


def make_cache(
    clock: ManualClock, upstream: Upstream, policy: Policy = POLICY, **kwargs: object
) -> TokenCache[str]:
    return TokenCache[str](
        metrics.Kind.ACCESS,
        Step.IAM_ACCESS,
        upstream,
        clock,
        policy,
        rng=random.Random(7),
        **kwargs,  # type: ignore[arg-type]
    )


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def advance_until(clock: ManualClock, condition: Callable[[], bool], limit: float = LIFETIME) -> None:
    """Step the clock one second at a time until ``condition`` holds."""
    start = clock.wall()
    while not condition():
        assert clock.wall() - start < limit, "condition never became true"
        await clock.advance(1)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def test_thousand_cold_callers_share_one_upstream_call(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    upstream.gate = asyncio.Event()
    cache = make_cache(clock, upstream)
    joined_before = sample("wif_broker_cache_lookups_total", kind="access", result="joined")
    waiters = [asyncio.create_task(cache.get("a")) for _ in range(1000)]
    await asyncio.sleep(0)
    upstream.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert len(upstream.calls) == 1
    assert {t.value for t in tokens} == {"token-1"}
    assert sample("wif_broker_cache_lookups_total", kind="access", result="joined") - joined_before == 999
    await cache.close()


async def test_distinct_keys_load_separately_and_hits_do_not_call(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream)
    assert (await cache.get("a")).value == "token-1"
    assert (await cache.get("b")).value == "token-2"
    assert (await cache.get("a")).value == "token-1"
    assert upstream.calls == ["a", "b"]
    await cache.close()


def test_scope_sets_ignore_order_and_duplicates() -> None:
    assert ScopeSet.parse("b,a") == ScopeSet.parse("a,b,a") == ScopeSet.of([" a", "b "])
    assert ScopeSet.parse("a,b") != ScopeSet.parse("a")
    assert not ScopeSet.parse("")


async def test_background_refresh_before_expiry_without_blocking_callers(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, keep_warm=lambda k: True)
    first = await cache.get("a")
    upstream.gate = asyncio.Event()  # the refresh will hang until released
    # refresh_at is within [expiry-600-360, expiry-600]; 3000 s in is past it.
    await clock.advance(LIFETIME - 600)
    assert len(upstream.calls) == 2, "refresh-ahead should have started"
    # A caller during the refresh gets the still-valid token at once.
    served = await asyncio.wait_for(cache.get("a"), timeout=1)
    assert served == first
    upstream.gate.set()
    await clock.advance(1)
    assert (await cache.get("a")).value == "token-2"
    await cache.close()


async def test_refresh_time_is_jittered_between_bounds(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, replace(POLICY, spread_first_refresh=False), keep_warm=lambda k: True)
    await cache.get("a")
    # Not before expiry - refresh_before - 10% of the lifetime ...
    await clock.advance(LIFETIME - 600 - 0.1 * LIFETIME - 1)
    assert len(upstream.calls) == 1
    # ... and no later than expiry - refresh_before.
    await clock.advance(0.1 * LIFETIME + 1)
    assert len(upstream.calls) == 2
    await cache.close()


async def test_first_refresh_is_spread_over_the_window_later_ones_jittered(clock: ManualClock) -> None:
    """Keys minted together (a fleet rolled out at once) must not refresh together: the
    first refresh is uniform between mint + first_refresh_floor and the normal jittered
    time; the refreshes after it keep the normal bounds."""
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, keep_warm=lambda k: True)
    keys = [f"k{i}" for i in range(200)]
    start = clock.wall()
    await asyncio.gather(*(cache.get(k) for k in keys))
    normal_latest = LIFETIME - 600
    floor = POLICY.first_refresh_floor

    def calls_of(key: str) -> list[float]:
        return [t - start for k, t in zip(upstream.calls, upstream.times, strict=True) if k == key]

    while min(len(calls_of(k)) for k in keys) < 3:
        await clock.advance(10)
    first = sorted(calls_of(k)[1] for k in keys)
    assert floor <= first[0], first[0]
    assert first[-1] <= normal_latest, first[-1]
    # Uniform over [60, 3000]: each tenth of it holds about 20 of the 200. The unspread
    # policy puts them all inside its 360 s jitter window, i.e. two tenths.
    width = (normal_latest - floor) / 10
    per_tenth = [sum(1 for t in first if floor + i * width <= t < floor + (i + 1) * width) for i in range(10)]
    assert min(per_tenth) >= 8, per_tenth
    assert max(per_tenth) <= 35, per_tenth
    # Every key's second token refreshes within the normal bounds of its own lifetime.
    for key in keys:
        lived = calls_of(key)[2] - calls_of(key)[1]
        assert LIFETIME - 600 - 0.1 * LIFETIME - 10 <= lived <= LIFETIME - 600 + 10, (key, lived)
    await cache.close()


async def test_never_serves_a_token_with_less_than_min_serve_ttl(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream)  # idle keys are not refreshed in the background
    await cache.get("a")
    await clock.advance(LIFETIME - 300)  # exactly min-serve-ttl left: not servable
    assert cache.servable("a") is None
    token = await cache.get("a")
    assert token.value == "token-2"
    assert token.expires_at - clock.wall() == LIFETIME
    await cache.close()


async def test_upstream_token_shorter_than_min_serve_ttl_is_an_error(clock: ManualClock) -> None:
    upstream = Upstream(clock, lifetime=200)
    cache = make_cache(clock, upstream)
    with pytest.raises(Transient, match="min-serve-ttl"):
        await cache.get("a")
    await cache.close()


async def test_stale_on_error_serves_cached_token_and_retries_with_backoff(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, keep_warm=lambda k: True)
    first = await cache.get("a")
    upstream.fail_with = Transient(Step.STS, "upstream 503", upstream_status=503)
    stale_before = sample("wif_broker_stale_tokens_served_total", kind="access")
    failed_before = sample("wif_broker_refreshes_total", kind="access", outcome="transient")
    await advance_until(clock, lambda: len(upstream.calls) >= 2)
    assert sample("wif_broker_refreshes_total", kind="access", outcome="transient") - failed_before >= 1
    assert await cache.get("a") == first
    assert sample("wif_broker_stale_tokens_served_total", kind="access") - stale_before == 1
    # Retries follow capped exponential backoff: several within the next minute.
    calls = len(upstream.calls)
    await clock.advance(60)
    retries = len(upstream.calls) - calls
    assert 2 <= retries <= 7, retries  # 1, 2, 4, 8, 16, 30 s (x0.5-1 jitter), not every second
    upstream.fail_with = None
    await clock.advance(POLICY.backoff_cap + 1)
    assert (await cache.get("a")).value != first.value
    await cache.close()


async def test_backoff_is_capped(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, keep_warm=lambda k: True)
    await cache.get("a")
    upstream.fail_with = Transient(Step.STS, "down")
    await clock.advance(LIFETIME - 600)
    await clock.advance(200)  # many failures: the interval must have reached the cap
    calls = len(upstream.calls)
    await clock.advance(POLICY.backoff_cap + 0.5)
    assert len(upstream.calls) == calls + 1 or len(upstream.calls) == calls + 2
    await cache.close()


async def test_denied_refresh_evicts(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, keep_warm=lambda k: True)
    await cache.get("a")
    upstream.fail_with = Denied(Step.IAM_ACCESS, "PERMISSION_DENIED", upstream_status=403)
    await clock.advance(LIFETIME - 600)
    assert cache.servable("a") is None
    with pytest.raises(Denied):
        await cache.get("a")
    await cache.close()


async def test_failed_cold_load_is_not_retried_until_backoff_elapses(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    upstream.fail_with = Transient(Step.STS, "down")
    cache = make_cache(clock, upstream)
    for _ in range(5):
        with pytest.raises(Transient):
            await cache.get("a")
    assert len(upstream.calls) == 1, "callers within the backoff get the cached error"
    upstream.fail_with = None
    await clock.advance(POLICY.backoff_base + 0.01)
    assert (await cache.get("a")).value == "token-2"
    await cache.close()


async def test_retry_after_is_honoured(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    upstream.fail_with = Transient(Step.STS, "slow down", upstream_status=429, retry_after=20)
    cache = make_cache(clock, upstream)
    with pytest.raises(Transient):
        await cache.get("a")
    await clock.advance(19)
    with pytest.raises(Transient):
        await cache.get("a")
    assert len(upstream.calls) == 1
    upstream.fail_with = None
    await clock.advance(1.5)
    await cache.get("a")
    assert len(upstream.calls) == 2
    await cache.close()


async def test_idle_keys_are_dropped_not_refreshed(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, keep_warm=lambda k: k == "warm")
    await cache.get("idle")
    await cache.get("warm")
    await clock.advance(LIFETIME - 600)
    assert upstream.calls == ["idle", "warm", "warm"]
    assert cache.servable("idle") is None
    await cache.close()


async def test_used_keys_keep_being_refreshed(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream)
    await cache.get("a")
    for _ in range(3):  # a client asking every 10 minutes keeps its token warm
        for _ in range(5):
            await clock.advance(600)
            await cache.get("a")
    assert len(upstream.calls) >= 3
    assert all(key == "a" for key in upstream.calls)
    await cache.close()


async def test_close_cancels_every_owned_task(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, keep_warm=lambda k: True)
    await cache.get("a")
    upstream.gate = asyncio.Event()
    pending = asyncio.create_task(cache.get("b"))
    await asyncio.sleep(0)
    before = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    assert len(before) >= 2  # the refresher of "a", the load of "b" (and the waiter)
    await cache.close()
    with pytest.raises(asyncio.CancelledError):
        await pending
    leftover = {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}
    assert leftover == set()


async def test_capped_cache_evicts_least_recently_used_and_their_refreshers(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, keep_warm=lambda k: k == "warm", max_entries=3)
    await cache.get("warm")
    for key in "abcdef":
        await cache.get(key)
        await cache.get("warm")  # a hit: never evicted anyway, being keep-warm
    assert len(cache) == 3
    assert [k for k in "abcdef" if cache.servable(k)] == ["e", "f"]
    tasks = {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}
    assert len(tasks) == 3  # one refresher per kept key; the evicted keys' were cancelled
    upstream.calls.clear()
    await cache.get("e")
    await cache.get("f")
    await clock.advance(LIFETIME - 600)
    assert sorted(set(map(str, upstream.calls))) == ["e", "f", "warm"]  # no evicted key reloaded
    await cache.close()


async def test_bucket_refuses_misses_but_not_keep_warm_keys_nor_hits(clock: ManualClock) -> None:
    upstream = Upstream(clock)
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    cache = make_cache(clock, upstream, keep_warm=lambda k: k == "warm", bucket=bucket)
    for key in "abc":
        await cache.get(key)
    with pytest.raises(RateLimited) as refused:
        await cache.get("d")
    assert refused.value.retry_after == 1
    assert upstream.calls == ["a", "b", "c"]
    await cache.get("a")  # a hit
    await cache.get("warm")  # exempt: the default token is never starved
    await clock.advance(0.5)
    await cache.get("d")
    assert upstream.calls == ["a", "b", "c", "warm", "d"]
    await cache.close()

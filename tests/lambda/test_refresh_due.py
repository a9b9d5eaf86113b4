"""Freeze-aware caching (SPEC §10) under a clock whose timers never fire.

A frozen Lambda sandbox runs no timer; when it thaws only the wall clock has moved.
``ThawClock`` is exactly that, so these tests show what the extension relies on:
``hit`` judges every token by the wall clock, and ``refresh_due`` renews what is
inside its refresh window without any background task having run.
"""

from __future__ import annotations

import asyncio
import random

from broker import metrics
from broker.cache import Policy, TokenCache
from broker.errors import Step
from broker.tokens import ScopeSet, Token, TokenKind

LIFETIME = 20.0
POLICY = Policy(refresh_before=8, min_serve_ttl=4, jitter_fraction=0.1)


class ThawClock:
    """Timers never fire (a frozen process runs none); tests move the wall clock by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def wall(self) -> float:
        return self.now

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.Event().wait()  # until the cache cancels its refresher


class Upstream:
    def __init__(self, clock: ThawClock) -> None:
        self.clock = clock
        self.calls: list[object] = []

    async def __call__(self, key: object) -> Token:
        self.calls.append(key)
        return Token(TokenKind.ACCESS, f"token-{len(self.calls)}", self.clock.wall() + LIFETIME)


def make_cache(clock: ThawClock, upstream: Upstream, **kwargs: object) -> TokenCache[ScopeSet]:
    return TokenCache[ScopeSet](
        metrics.Kind.ACCESS,
        Step.IAM_ACCESS,
        upstream,
        clock,
        POLICY,
        rng=random.Random(7),
        **kwargs,  # type: ignore[arg-type]
    )


A = ScopeSet.of(["a"])
B = ScopeSet.of(["b"])


async def test_no_token_with_less_than_min_serve_ttl_after_a_thaw() -> None:
    clock = ThawClock()
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream)
    try:
        first = await cache.get(A)
        clock.now += LIFETIME - POLICY.min_serve_ttl + 0.5  # thawed with 3.5 s left on the token
        assert cache.hit(A) is None, "served a token with less than min-serve-ttl left"
        second = await cache.get(A)
        assert second.value != first.value
        assert second.expires_at - clock.wall() == LIFETIME
        assert len(upstream.calls) == 2
    finally:
        await cache.close()


async def test_refresh_due_renews_only_what_is_inside_its_window() -> None:
    clock = ThawClock()
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream, keep_warm=lambda key: key == A)
    try:
        await cache.get(A)
        await cache.get(B)  # loaded once, never asked for again: idle
        assert await cache.refresh_due() == 0, "nothing is due right after the mint"
        assert len(upstream.calls) == 2
        clock.now += LIFETIME - POLICY.min_serve_ttl - 0.5  # past every refresh time, still servable
        assert await cache.refresh_due() == 1  # A is kept warm; idle B is left to lapse
        assert upstream.calls[-1] == A
        token = cache.hit(A)
        assert token is not None
        assert token.expires_at - clock.wall() == LIFETIME
        assert await cache.refresh_due() == 0, "a fresh token is not refreshed again"
    finally:
        await cache.close()


async def test_refresh_due_renews_a_token_clients_used() -> None:
    clock = ThawClock()
    upstream = Upstream(clock)
    cache = make_cache(clock, upstream)
    try:
        await cache.get(B)
        assert cache.hit(B) is not None  # a client asked again since the load
        clock.now += LIFETIME  # expired while frozen
        assert await cache.refresh_due() == 1
        assert cache.hit(B) is not None
        assert len(upstream.calls) == 2
    finally:
        await cache.close()

"""What a token cache may do: its timing policy and its budget of upstream calls.

Kept apart from :mod:`broker.cache` (the mechanism) so the numbers an operator
tunes, and the bucket that several caches share, read on their own.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from broker.clock import Clock
from broker.errors import RateLimited, Step


@dataclass(frozen=True, slots=True)
class Policy:
    refresh_before: float = 600
    min_serve_ttl: float = 300
    jitter_fraction: float = 0.1  # of the token lifetime, subtracted at random from refresh_at
    # Brokers rolled out together mint together. Jitter of one lifetime spreads their
    # refreshes only a few minutes, and later draws widen that like a random walk
    # (weeks to even out): bench/fleet.py measured peak/mean 7.6 per minute for 10,000
    # brokers. Drawing the first refresh uniformly over the whole window gives the herd
    # even phases at once (1.2), for about one extra call per key per process start.
    spread_first_refresh: bool = True
    first_refresh_floor: float = 60.0  # not sooner than this after the mint (or half the window)
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    retry_after_cap: float = 300.0

    def refresh_at(self, expires_at: float, now: float, rng: random.Random, *, first: bool = False) -> float:
        """When to renew a token minted at ``now``: ``refresh_before`` plus jitter ahead of
        expiry, or for a key's first token a uniform draw over the window (see above)."""
        lifetime = max(expires_at - now, 0.0)
        ideal = expires_at - self.refresh_before - rng.uniform(0, self.jitter_fraction * lifetime)
        servable_until = expires_at - self.min_serve_ttl
        # Short-lived tokens: still leave half the servable window before renewing.
        normal = max(ideal, now + (servable_until - now) / 2)
        if not (first and self.spread_first_refresh):
            return normal
        span = max(normal - now, 0.0)
        return now + rng.uniform(min(self.first_refresh_floor, span / 2), span)

    def backoff(self, failures: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds before the next try after ``failures`` in a row: capped exponential with
        jitter, never sooner than an upstream's ``Retry-After`` (itself capped)."""
        delay = min(self.backoff_cap, self.backoff_base * 2.0 ** (failures - 1))
        delay *= rng.uniform(0.5, 1.0)
        if retry_after:
            delay = max(delay, min(retry_after, self.retry_after_cap))
        return delay


class TokenBucket:
    """``rate`` upstream-bound misses per second, ``burst`` at once (SPEC §8 ``upstream-rate``).

    Refilled lazily from the clock on each take, so it owns no task. Shared by
    every cache whose misses reach IAM: distinct scope sets and audiences draw
    from one budget, whichever a caller varies."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._level = burst
        self._at = clock.wall()

    def take(self) -> float:
        """0 when a token was taken; else the seconds until one will be available."""
        now = self._clock.wall()
        self._level = min(self._burst, self._level + max(now - self._at, 0.0) * self._rate)
        self._at = now
        if self._level >= 1.0:
            self._level -= 1.0
            return 0.0
        return (1.0 - self._level) / self._rate

    def take_or_refuse(self, step: Step) -> None:
        """Take a token, or raise :class:`RateLimited` (for ``step``) saying when to retry."""
        wait = self.take()
        if wait:
            raise RateLimited(
                step,
                "too many distinct token requests; upstream calls are rate limited",
                fix="reuse scope sets and audiences, or raise upstream-rate",
                retry_after=float(max(1, math.ceil(wait))),
            )

"""A fleet of brokers started together, simulated: STS and IAM request rates over hours.

Each simulated broker is the token chain's two caches as ``TokenChain`` builds
them (the real ``broker.cache.TokenCache``, same Policy fields): a federated
cache (kept warm) whose loader counts an STS call, and an access cache for the
default scope set (kept warm) whose loader takes the federated token from the
first cache and counts a generateAccessToken call. All N brokers mint their
first token at t = 0 (a fleet-wide rollout or a cluster restart) and then run
on one ``ManualClock`` for the simulated hours; every loader call is binned by
simulated minute.

Policies compared, all through ``Policy`` fields of the real cache: no jitter at
all; jitter alone (``jitter_fraction`` 10% of the lifetime, the broker's default
before this bench: ``spread_first_refresh=False``); and the broker's default
``Policy()``, which also spreads each key's *first* refresh uniformly between the
mint and its normal refresh time. The target: peak minute <= 1.5 x mean minute
after the first hour.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from broker import metrics
from broker.cache import Policy, TokenCache
from broker.clock import ManualClock
from broker.errors import Step
from broker.tokens import Token, TokenKind

TARGET_RATIO = 1.5
STS_QUOTA_PER_MIN = 6_000  # Security Token Service API, token exchange requests per project per minute
IAM_QUOTA_PER_MIN = (
    60_000  # IAM Service Account Credentials API, generate credentials requests per project per minute
)


@dataclass
class PolicyRun:
    name: str
    jitter_fraction: float
    spread_first: bool
    brokers: int
    hours: float
    lifetime: float
    sts_per_min: list[int] = field(default_factory=list)
    iam_per_min: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0

    def _after_first_hour(self, series: list[int]) -> list[int]:
        return series[60:] if len(series) > 60 else series

    def stats(self, series: list[int]) -> tuple[int, float, float, int]:
        """(peak/min after the first hour, mean/min after it, ratio, peak/min in the first hour)."""
        after = self._after_first_hour(series)
        mean = sum(after) / len(after) if after else 0.0
        peak = max(after) if after else 0
        return peak, mean, (peak / mean if mean else float("inf")), max(series[:60] or [0])

    @property
    def sts(self) -> tuple[int, float, float, int]:
        return self.stats(self.sts_per_min)

    @property
    def iam(self) -> tuple[int, float, float, int]:
        return self.stats(self.iam_per_min)

    @property
    def passed(self) -> bool:
        return self.sts[2] <= TARGET_RATIO and self.iam[2] <= TARGET_RATIO

    def calls_per_broker_hour(self) -> tuple[float, float]:
        hours = len(self.sts_per_min) / 60
        return (
            sum(self.sts_per_min) / self.brokers / hours,
            sum(self.iam_per_min) / self.brokers / hours,
        )


class _SimBroker:
    """The two caches of one broker's TokenChain, with counting loaders."""

    def __init__(
        self,
        clock: ManualClock,
        policy: Policy,
        rng: random.Random,
        count: Callable[[str], None],
        lifetime: float,
    ) -> None:
        self.clock, self.count, self.lifetime = clock, count, lifetime
        self.federated = TokenCache[str](
            metrics.Kind.FEDERATED, Step.STS, self._sts, clock, policy, keep_warm=lambda k: True, rng=rng
        )
        self.access = TokenCache[str](
            metrics.Kind.ACCESS, Step.IAM_ACCESS, self._iam, clock, policy, keep_warm=lambda k: True, rng=rng
        )

    async def _sts(self, key: str) -> Token:
        self.count("sts")
        return Token(TokenKind.FEDERATED, "federated", self.clock.wall() + self.lifetime)

    async def _iam(self, key: str) -> Token:
        await self.federated.get("cloud-platform")
        self.count("iam")
        # IAM's expireTime has whole seconds.
        return Token(TokenKind.ACCESS, "access", float(int(self.clock.wall() + self.lifetime)))

    async def close(self) -> None:
        await self.access.close()
        await self.federated.close()


async def simulate(
    name: str,
    *,
    brokers: int,
    hours: float,
    jitter_fraction: float,
    spread_first: bool = False,
    lifetime: float = 3600,
    refresh_before: float = 600,
    min_serve_ttl: float = 300,
    seed: int = 1,
    progress: Callable[[str], None] = print,
) -> PolicyRun:
    run = PolicyRun(name, jitter_fraction, spread_first, brokers, hours, lifetime)
    minutes = int(hours * 60)
    sts = [0] * minutes
    iam = [0] * minutes
    clock = ManualClock(start=0.0)

    def count(kind: str) -> None:
        minute = int(clock.wall() // 60)
        if minute < minutes:
            (sts if kind == "sts" else iam)[minute] += 1

    policy = replace(
        Policy(),
        refresh_before=refresh_before,
        min_serve_ttl=min_serve_ttl,
        jitter_fraction=jitter_fraction,
        spread_first_refresh=spread_first,
    )
    rng = random.Random(seed)
    began = time.perf_counter()
    fleet = [_SimBroker(clock, policy, rng, count, lifetime) for _ in range(brokers)]
    # Every broker's start-up pre-warm, all at t = 0.
    await asyncio.gather(*(b.access.get("default") for b in fleet))
    for minute in range(minutes):
        await clock.advance(60)
        if minute % 60 == 59:
            progress(f"    {name}: simulated {(minute + 1) // 60} h of {hours:g}")
    for b in fleet:
        await b.close()
    run.sts_per_min, run.iam_per_min = sts, iam
    run.wall_seconds = time.perf_counter() - began
    return run


async def measure(
    brokers: int, hours: float, progress: Callable[[str], None] = print, seed: int = 1
) -> list[PolicyRun]:
    logging.getLogger("broker.cache").setLevel(logging.WARNING)
    default = Policy()
    jitter = default.jitter_fraction
    runs = []
    for name, fraction, spread in (
        ("no jitter (jitter_fraction=0, spread_first_refresh=False)", 0.0, False),
        (f"jitter only (jitter_fraction={jitter:g}, spread_first_refresh=False)", jitter, False),
        (
            f"default Policy() (jitter_fraction={jitter:g}, "
            f"spread_first_refresh={default.spread_first_refresh})",
            jitter,
            default.spread_first_refresh,
        ),
    ):
        progress(f"  fleet: {brokers:,} brokers, {hours:g} h, {name}")
        runs.append(
            await simulate(
                name,
                brokers=brokers,
                hours=hours,
                jitter_fraction=fraction,
                spread_first=spread,
                seed=seed,
                progress=progress,
            )
        )
    return runs

"""Herd and rotation: continuous load across several token rotations; nobody waits on a refresh.

60 s tokens, ``--refresh-before 30 --min-serve-ttl 10``, and both fakes answer
after 50 ms, so a request that waited on a refresh would take at least that
long. ``clients`` closed-loop clients (one keep-alive connection each) ask for
the default token for ``seconds``. Each answer's start time, latency, token
and ``expires_in`` are kept. The proof that nobody waited is the broker's own
count: access-cache lookups that were a miss or joined an in-flight load
(``wif_broker_cache_lookups_total``) must not move during the run; refresh-ahead
loads do not go through a lookup. A rotation is the first answer carrying a new
token; requests within 1 s before to 0.5 s after it form the rotation windows
(the refresh's upstream calls are in flight in that span), compared with the
rest of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.rig import rig, scrape
from bench.throughput import SERVER_CORE
from bench.wire import FLAVOR

LIFETIME = 60
REFRESH_BEFORE = 30
MIN_SERVE_TTL = 10
UPSTREAM_DELAY = 0.05
WINDOW_BEFORE = 1.0
WINDOW_AFTER = 0.5


@dataclass
class Answer:
    t: float  # request start, seconds since the load began
    latency_ms: float
    token: int  # index of the distinct token, in order of first sighting (-1: no token)
    expires_in: int
    status: int


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class RotationResult:
    clients: int
    seconds: float
    answers: list[Answer] = field(default_factory=list)
    rotations: list[float] = field(default_factory=list)  # times of first sighting of each new token
    sts_calls: int = 0
    iam_calls: int = 0
    waited: int = -1  # access-cache lookups that missed or joined a load during the run (broker metrics)
    errors: list[str] = field(default_factory=list)

    def in_window(self, a: Answer) -> bool:
        return any(r - WINDOW_BEFORE <= a.t <= r + WINDOW_AFTER for r in self.rotations)

    def latencies(self, windows: bool) -> list[float]:
        return [a.latency_ms for a in self.answers if a.status == 200 and self.in_window(a) == windows]

    def slow(self, windows: bool) -> int:
        """Answers that took at least the upstream delay: what waiting on a refresh would cost."""
        return sum(1 for v in self.latencies(windows) if v >= UPSTREAM_DELAY * 1000)

    @property
    def min_expires_in(self) -> int:
        return min((a.expires_in for a in self.answers if a.status == 200), default=-1)

    @property
    def non_200(self) -> int:
        return sum(1 for a in self.answers if a.status != 200)

    def summary(self, windows: bool) -> dict[str, float]:
        values = self.latencies(windows)
        return {
            "n": len(values),
            "p50": _pct(values, 0.5),
            "p99": _pct(values, 0.99),
            "max": max(values, default=float("nan")),
            "slow": self.slow(windows),
        }

    @property
    def passed(self) -> bool:
        return (
            not self.errors
            and self.non_200 == 0
            and self.min_expires_in >= MIN_SERVE_TTL
            and len(self.rotations) >= 2
            and self.waited == 0
        )


def _waited(values: dict[str, float]) -> float:
    return sum(
        values.get(f"wif_broker_cache_lookups_total{{kind=access,result={r}}}", 0.0)
        for r in ("miss", "joined")
    )


async def measure(workdir: Path, clients: int, seconds: float, pin: bool) -> RotationResult:
    result = RotationResult(clients, seconds)
    flags = ["--refresh-before", str(REFRESH_BEFORE), "--min-serve-ttl", str(MIN_SERVE_TTL)]
    core = SERVER_CORE if pin else None
    async with rig(
        workdir / "rotation", lifetime=LIFETIME, delay=UPSTREAM_DELAY, broker_flags=flags, core=core
    ) as r:
        tokens: dict[str, int] = {}
        async with aiohttp.ClientSession() as admin:
            lookups_before = _waited(await scrape(admin, r.admin_url))
        began = time.perf_counter()
        stop = asyncio.Event()

        async def client() -> None:
            connector = aiohttp.TCPConnector(limit=1)
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                while not stop.is_set():
                    start = time.perf_counter()
                    try:
                        async with session.get(r.token_url, headers=FLAVOR) as resp:
                            body = await resp.read()
                            status = resp.status
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        result.errors.append(f"{type(exc).__name__}: {exc}")
                        await asyncio.sleep(0.1)
                        continue
                    if stop.is_set():
                        break  # answered during shutdown (GC back on): not part of the run
                    latency = (time.perf_counter() - start) * 1000
                    index, expires_in = -1, -1
                    if status == 200:
                        doc = json.loads(body)
                        token = doc["access_token"]
                        if token not in tokens:
                            tokens[token] = len(tokens)
                            if tokens[token] > 0:
                                result.rotations.append(start - began)
                        index, expires_in = tokens[token], int(doc["expires_in"])
                    result.answers.append(Answer(start - began, latency, index, expires_in, status))

        # The answers list grows to 10^5 objects: the cyclic GC's full collections over it stall this
        # process (all clients at once, 0.1-0.6 s, growing with the list) - client noise, not the broker's.
        gc.disable()
        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        try:
            await asyncio.sleep(seconds)
        finally:
            gc.enable()
            stop.set()
            done, pending = await asyncio.wait(tasks, timeout=30)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for task in done:
                if task.exception() is not None:
                    result.errors.append(repr(task.exception()))
        async with aiohttp.ClientSession() as admin:
            result.waited = int(_waited(await scrape(admin, r.admin_url)) - lookups_before)
        result.sts_calls = len(r.google.sts.calls)
        result.iam_calls = len(r.google.iam.calls)
    return result

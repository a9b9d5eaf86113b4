"""Soak: hours of 60-second tokens under steady load; nothing expired served, memory and tasks flat.

The fakes issue 60 s tokens (STS and IAM); the broker runs with
``--refresh-before 30 --min-serve-ttl 10`` so it renews every ~25-30 s. Client
tasks in the bench process keep asking for the default token, for a rotating set
of ten other scope sets and for three ID-token audiences, and check every answer:
200, an access token's ``expires_in`` >= min-serve-ttl (the broker truncates the
seconds left, so the strict bound shows as equality at worst), an ID token's
``exp`` more than min-serve-ttl after the request started. Every ``interval``
seconds /metrics is sampled: ``process_resident_memory_bytes``,
``process_open_fds``, the bench-only ``bench_event_loop_tasks`` (see
``bench.instrumented``), cached tokens and upstream calls. The subject-token
file is rotated every 10 minutes, as the kubelet would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.instrumented import TASKS_METRIC
from bench.rig import rig, scrape
from bench.throughput import SERVER_CORE
from bench.wire import FLAVOR, TOKEN_PATH

LIFETIME = 60
REFRESH_BEFORE = 30
MIN_SERVE_TTL = 10
SUBJECT_ROTATION_SECONDS = 600
THINK_SECONDS = 0.02  # per client between requests: a few hundred requests/s in all
SCOPE_SETS = [f"https://www.googleapis.com/auth/soak-{n}" for n in range(10)]
AUDIENCES = [f"https://soak-{n}.example.com" for n in range(3)]
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mib: float
    tasks: float
    fds: float
    cached: float
    sts_calls: float
    iam_calls: float
    requests: int


@dataclass
class SoakResult:
    minutes: float
    lifetime: int = LIFETIME
    refresh_before: int = REFRESH_BEFORE
    min_serve_ttl: int = MIN_SERVE_TTL
    samples: list[Sample] = field(default_factory=list)
    requests: int = 0
    access_checked: int = 0
    id_checked: int = 0
    min_expires_in: float = float("inf")
    min_id_left: float = float("inf")
    default_tokens_seen: int = 0
    subject_rotations: int = 0
    violations: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def steady(self) -> list[Sample]:
        """Samples after the first 10% (at least 2 min, warm-up: caches and pools fill)."""
        skip = max(120.0, 0.1 * self.minutes * 60)
        rest = [s for s in self.samples if s.t >= skip]
        return rest or self.samples

    def drift(self, name: str) -> tuple[float, float]:
        """(median of the first quarter, median of the last quarter) of the steady samples."""
        values = [getattr(s, name) for s in self.steady()]
        quarter = max(1, len(values) // 4)
        return statistics.median(values[:quarter]), statistics.median(values[-quarter:])

    def slope_per_hour(self, name: str) -> float:
        """Least-squares slope of ``name`` over the steady samples, per hour."""
        points = [(s.t, getattr(s, name)) for s in self.steady()]
        if len(points) < 2:
            return 0.0
        mean_t = statistics.fmean(t for t, _ in points)
        mean_v = statistics.fmean(v for _, v in points)
        den = sum((t - mean_t) ** 2 for t, _ in points)
        return 3600 * sum((t - mean_t) * (v - mean_v) for t, v in points) / den if den else 0.0

    @property
    def rss_flat(self) -> bool:
        first, last = self.drift("rss_mib")
        return last - first <= max(2.0, 0.05 * first)

    @property
    def tasks_flat(self) -> bool:
        """Medians, like RSS: a sample also counts whatever is in flight at that instant (a
        request handler, a refresh's load), so single samples jitter by a few tasks."""
        first, last = self.drift("tasks")
        return last <= first + 2

    @property
    def passed(self) -> bool:
        return not self.violations and self.rss_flat and self.tasks_flat and self.requests > 0


def _jwt_exp(token: str) -> float:
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


async def _client(
    session: aiohttp.ClientSession,
    base: str,
    result: SoakResult,
    stop: asyncio.Event,
    kind: str,
    seen: set[str],
) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        if kind == "default":
            url = base + TOKEN_PATH
        elif kind == "scopes":
            url = f"{base}{TOKEN_PATH}?scopes={SCOPE_SETS[n % len(SCOPE_SETS)]}"
        else:
            url = f"{base}{IDENTITY_PATH}?audience={AUDIENCES[n % len(AUDIENCES)]}&format=full"
        started = time.time()
        try:
            async with session.get(url, headers=FLAVOR) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.violations.append(f"{kind}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)
            continue
        result.requests += 1
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status != 200:
            if len(result.violations) < 50:
                result.violations.append(f"{kind}: HTTP {status}: {body[:200]!r}")
            continue
        if kind == "identity":
            left = _jwt_exp(body.decode()) - started
            result.id_checked += 1
            result.min_id_left = min(result.min_id_left, left)
            if left <= MIN_SERVE_TTL and len(result.violations) < 50:
                result.violations.append(f"ID token with {left:.2f}s left served")
        else:
            doc = json.loads(body)
            result.access_checked += 1
            result.min_expires_in = min(result.min_expires_in, doc["expires_in"])
            if doc["expires_in"] < MIN_SERVE_TTL and len(result.violations) < 50:
                result.violations.append(f"{kind}: token with expires_in {doc['expires_in']} served")
            if kind == "default":
                seen.add(doc["access_token"])
        await asyncio.sleep(THINK_SECONDS)


async def measure(
    workdir: Path,
    minutes: float,
    pin: bool,
    interval: float = 10.0,
    progress: Callable[[str], None] = print,
) -> SoakResult:
    result = SoakResult(minutes=minutes)
    flags = ["--refresh-before", str(REFRESH_BEFORE), "--min-serve-ttl", str(MIN_SERVE_TTL)]
    core = SERVER_CORE if pin else None
    async with (
        rig(workdir / "soak", lifetime=LIFETIME, broker_flags=flags, core=core) as r,
        aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30), connector=aiohttp.TCPConnector(limit=0)
        ) as session,
    ):
        stop = asyncio.Event()
        seen: set[str] = set()
        kinds = ["default"] * 6 + ["scopes"] * 2 + ["identity"]
        clients = [asyncio.create_task(_client(session, r.base_url, result, stop, k, seen)) for k in kinds]
        began = time.perf_counter()
        next_rotation = SUBJECT_ROTATION_SECONDS
        try:
            while (elapsed := time.perf_counter() - began) < minutes * 60:
                if not r.broker.alive():
                    raise RuntimeError(f"the broker died:\n{r.broker.log_tail()}")
                values = await scrape(session, r.admin_url)
                cached = sum(v for k, v in values.items() if k.startswith("wif_broker_cached_tokens{"))
                result.samples.append(
                    Sample(
                        t=elapsed,
                        rss_mib=values["process_resident_memory_bytes"] / 2**20,
                        tasks=values[TASKS_METRIC],
                        fds=values.get("process_open_fds", 0.0),
                        cached=cached,
                        sts_calls=len(r.google.sts.calls),
                        iam_calls=len(r.google.iam.calls),
                        requests=result.requests,
                    )
                )
                if len(result.samples) % max(1, int(60 / interval)) == 0:
                    s = result.samples[-1]
                    progress(
                        f"    soak {elapsed / 60:5.1f}/{minutes:g} min: {result.requests:,} requests, "
                        f"RSS {s.rss_mib:.1f} MiB, tasks {s.tasks:.0f}, fds {s.fds:.0f}, "
                        f"STS {s.sts_calls:.0f} IAM {s.iam_calls:.0f}, violations {len(result.violations)}"
                    )
                if elapsed >= next_rotation:
                    r.rotate_subject_token()
                    result.subject_rotations += 1
                    next_rotation += SUBJECT_ROTATION_SECONDS
                await asyncio.sleep(interval)
        finally:
            stop.set()
            for task in clients:
                task.cancel()
            for task in clients:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        result.default_tokens_seen = len(seen)
    return result

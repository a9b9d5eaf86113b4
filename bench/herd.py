"""Herd / single-flight: many concurrent cold requests, counted at the fake upstreams.

The production ``daemon.serve`` runs in this process against a fresh
``FakeGoogle`` for each scenario. STS is held behind its gate from before the
broker starts (so the start-up pre-warm is part of the herd), every client
request is fired, and the gate opens only once the broker has looked up all of
them in its access-token cache (read from its own Prometheus counters), so the
requests really do overlap the one in-flight exchange. Both fakes also answer
with a small delay. Then the calls each fake received are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp

from bench.common import write_credentials
from bench.wire import FLAVOR, TOKEN_PATH
from broker import daemon, metrics, settings
from broker.fakes import FakeGoogle

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
USERINFO = "https://www.googleapis.com/auth/userinfo.email"
ARRIVAL_TIMEOUT = 30.0  # seconds to wait for every request to reach the cache
HERD_TIMEOUT = 60.0  # hard bound on one scenario


@dataclass
class HerdResult:
    name: str
    clients: int
    scope_sets: int
    expected_sts: int
    expected_iam: int
    sts_calls: int = 0
    iam_calls: int = 0
    ok_responses: int = 0
    distinct_tokens: int = 0
    arrived_before_release: int = 0  # cache lookups seen while STS was held
    lookups: dict[str, int] = field(default_factory=dict)  # access-cache hit/miss/joined deltas
    seconds: float = 0.0  # gate release -> last response
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            not self.errors
            and self.sts_calls == self.expected_sts
            and self.iam_calls == self.expected_iam
            and self.ok_responses == self.clients
            and self.distinct_tokens == self.scope_sets
        )


def _lookups() -> dict[str, int]:
    out = {}
    for result in metrics.CacheResult:
        value = metrics.REGISTRY.get_sample_value(
            "wif_broker_cache_lookups_total", {"kind": metrics.Kind.ACCESS.value, "result": result.value}
        )
        out[result.value] = int(value or 0)
    return out


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after}


def one_set_queries(clients: int) -> list[str]:
    """Every client asks for the default scope set, half by name, half by omission."""
    return ["" if i % 2 else "?scopes=" + quote(CLOUD_PLATFORM, safe="") for i in range(clients)]


def many_set_queries(scope_sets: int, per_set: int) -> list[str]:
    """``scope_sets`` distinct sets; set 0 is the broker default (the pre-warm's own).

    The others are {userinfo.email, bench-N}; clients of one set alternate the
    order and separator, which the broker must treat as the same set.
    """
    queries = []
    for n in range(scope_sets):
        for i in range(per_set):
            if n == 0:
                queries.append("" if i % 2 else "?scopes=" + quote(CLOUD_PLATFORM, safe=""))
                continue
            pair = [USERINFO, f"https://www.googleapis.com/auth/bench-{n:03d}"]
            joined = ",".join(pair) if i % 2 else " ".join(reversed(pair))
            queries.append("?scopes=" + quote(joined, safe=""))
    return queries


async def run_scenario(result: HerdResult, queries: list[str], delay: float) -> HerdResult:
    async with contextlib.AsyncExitStack() as stack:
        google = await stack.enter_async_context(FakeGoogle())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wif-bench-herd-")))
        cred = write_credentials(google, tmp)
        google.sts.delay_seconds = google.iam.delay_seconds = delay
        gate = google.sts.gate = asyncio.Event()
        resolved = settings.build(
            {
                "credentials": str(cred),
                "listen": ["127.0.0.1:0"],
                "admin_listen": "127.0.0.1:0",
                "log_level": "warning",
                # The herd measures single-flight, not the upstream budget (SPEC §8, default
                # burst 40): 50 scope sets at once must all reach IAM, each exactly once.
                "upstream_rate": "1000",
            },
            environ={},
        )
        stop = asyncio.Event()
        ready: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()

        async def on_listening(addresses: list[str], _admin: list[str]) -> None:
            ready.set_result(addresses)

        before = _lookups()
        serving = asyncio.create_task(daemon.serve(resolved, stop=stop, on_listening=on_listening))
        try:
            done, _ = await asyncio.wait({serving, ready}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
            if serving in done:
                serving.result()
            if ready not in done:
                raise TimeoutError("broker did not start listening within 15 s")
            base = f"http://{ready.result()[0]}{TOKEN_PATH}"
            await _fire(result, base, queries, gate, before)
        except Exception as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            gate.set()
            stop.set()
            try:
                await asyncio.wait_for(serving, timeout=15)
            finally:
                _restore_signals()
        result.sts_calls = len(google.sts.calls)
        result.iam_calls = len(google.iam.calls)
    return result


async def _fire(
    result: HerdResult, base: str, queries: list[str], gate: asyncio.Event, before: dict[str, int]
) -> None:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=HERD_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(query: str) -> tuple[int, str]:
            async with session.get(base + query, headers=FLAVOR) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else {}
                return resp.status, str(body.get("access_token", ""))

        tasks = [asyncio.create_task(one(q)) for q in queries]
        try:
            # The pre-warm asks the federated cache first (chain.warm), so the access-token
            # lookups counted here are the clients' own: the first one starts the access load
            # (which joins the held STS exchange), the rest join it.
            deadline = time.perf_counter() + ARRIVAL_TIMEOUT
            while time.perf_counter() < deadline:
                seen = sum(_delta(_lookups(), before).values())
                if seen >= len(queries) or all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.01)
            result.arrived_before_release = sum(_delta(_lookups(), before).values())
            released = time.perf_counter()
            gate.set()
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), HERD_TIMEOUT)
            result.seconds = time.perf_counter() - released
        finally:
            for task in tasks:
                task.cancel()
    statuses: dict[str, int] = {}
    tokens: set[str] = set()
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            key = type(outcome).__name__
        else:
            status, token = outcome
            key = str(status)
            if status == 200 and token:
                result.ok_responses += 1
                tokens.add(token)
        statuses[key] = statuses.get(key, 0) + 1
    result.distinct_tokens = len(tokens)
    result.lookups = _delta(_lookups(), before)
    if result.ok_responses != len(queries):
        result.errors.append(f"responses by status: {statuses}")


def _restore_signals() -> None:
    # daemon.serve installed SIGINT/SIGTERM handlers on this loop; give Ctrl-C back.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(sig)


async def measure(clients: int, scope_sets: int, per_set: int, delay: float) -> list[HerdResult]:
    logging.getLogger("broker").setLevel(logging.WARNING)
    one = HerdResult(
        f"{clients} clients, 1 scope set",
        clients=clients,
        scope_sets=1,
        expected_sts=1,
        expected_iam=1,
    )
    await run_scenario(one, one_set_queries(clients), delay)
    many = HerdResult(
        f"{scope_sets} scope sets x {per_set} clients",
        clients=scope_sets * per_set,
        scope_sets=scope_sets,
        expected_sts=1,
        expected_iam=scope_sets,
    )
    await run_scenario(many, many_set_queries(scope_sets, per_set), delay)
    return [one, many]

"""Sustained load: 256 connections for 60 s of wrk against a warm broker, zero errors.

The broker process is pinned to core 0 and wrk to core 1 when ``taskset`` can;
errors are wrk's socket errors plus non-2xx answers (from its Lua ``done`` hook).
RSS and the event loop's task count are read before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.instrumented import TASKS_METRIC
from bench.rig import rig, scrape
from bench.throughput import LUA, SERVER_CORE, WRK_CORE, WrkRun, run_wrk


@dataclass
class LoadResult:
    connections: int
    seconds: int
    run: WrkRun
    rss_before_mib: float
    rss_after_mib: float
    tasks_before: float
    tasks_after: float
    sts_calls: int
    iam_calls: int

    @property
    def errors(self) -> int:
        return self.run.error_total

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.run.requests > 0


def _write_lua(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    lua = workdir / "percentiles.lua"
    lua.write_text(LUA)
    return lua


async def measure(workdir: Path, connections: int, seconds: int, pin: bool) -> LoadResult:
    server_core, wrk_core = (SERVER_CORE, WRK_CORE) if pin else (None, None)
    lua = _write_lua(workdir)
    async with rig(workdir / "load", core=server_core) as r, aiohttp.ClientSession() as session:
        await run_wrk("broker", r.token_url, 32, 2, lua, wrk_core)  # warm-up
        before = await scrape(session, r.admin_url)
        run = await run_wrk("broker", r.token_url, connections, seconds, lua, wrk_core)
        after = await scrape(session, r.admin_url)
        if not r.broker.alive():
            raise RuntimeError(f"the broker died under load:\n{r.broker.log_tail()}")
        return LoadResult(
            connections=connections,
            seconds=seconds,
            run=run,
            rss_before_mib=before["process_resident_memory_bytes"] / 2**20,
            rss_after_mib=after["process_resident_memory_bytes"] / 2**20,
            tasks_before=before[TASKS_METRIC],
            tasks_after=after[TASKS_METRIC],
            sts_calls=len(r.google.sts.calls),
            iam_calls=len(r.google.iam.calls),
        )

"""Start-up: process spawn → ``/readyz`` 200, resident memory once ready, import cost.

``/readyz`` turns 200 only once the default access token is cached, so the
figure covers interpreter start, imports, settings, binding both listeners and
the first STS + IAM round trip to the local fakes. The clock starts just before
the process is spawned and stops at the first 200 of a 5 ms poll.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import (
    REPO,
    BenchError,
    broker_cmd,
    child_env,
    free_port,
    started,
    wait_ok,
    write_credentials,
)
from bench.wire import LOOPBACK
from broker.fakes import FakeGoogle

IMPORT_TARGET = "broker.cli"
_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


@dataclass
class StartupRun:
    ready_seconds: float
    rss_kib: int
    hwm_kib: int


@dataclass
class ImportCost:
    importtime_ms: float = 0.0  # -X importtime cumulative for broker + broker.cli
    wall_ms: float = 0.0  # python -c 'import broker.cli' minus python -c 'pass', median
    heaviest: list[tuple[str, float]] = field(default_factory=list)  # (package, self ms)


@dataclass
class SdkImport:
    """What a cloud's source module adds once ``broker.cli`` is loaded (one fresh process)."""

    module: str
    sdk_loaded_before: bool  # was any cloud SDK already in sys.modules after broker.cli?
    import_ms: float
    rss_added_kib: int


# The cloud SDKs, imported by build_source only for the source in use.
SDK_MODULES = ("broker.sources.aws", "broker.sources.azure")
_SDK_PROBE = """
import importlib, json, sys, time
def rss():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmRSS:"))
import broker.cli
before = rss()
sdk = any(m.split(".")[0] in ("botocore", "boto3", "azure", "msal") for m in sys.modules)
began = time.perf_counter()
importlib.import_module(sys.argv[1])
print(json.dumps({"sdk": sdk, "ms": (time.perf_counter() - began) * 1000, "kib": rss() - before}))
"""


@dataclass
class StartupResult:
    runs: list[StartupRun] = field(default_factory=list)
    imports: ImportCost = field(default_factory=ImportCost)
    sdks: list[SdkImport] = field(default_factory=list)

    @property
    def ready_median(self) -> float:
        return statistics.median(r.ready_seconds for r in self.runs)

    @property
    def rss_median_mib(self) -> float:
        return statistics.median(r.rss_kib for r in self.runs) / 1024

    @property
    def rss_max_mib(self) -> float:
        return max(r.rss_kib for r in self.runs) / 1024


async def one_run(session: aiohttp.ClientSession, cred: Path, log: Path) -> StartupRun:
    port, admin = free_port(), free_port()
    async with started("broker", broker_cmd(cred, port, admin), log) as child:
        ready_at = await wait_ok(session, child, f"http://{LOOPBACK}:{admin}/readyz", within=20)
        return StartupRun(ready_at - child.started, child.status_kib("VmRSS"), child.status_kib("VmHWM"))


async def _python(*args: str, stdout: list[str] | None = None) -> tuple[float, str]:
    """Run the bench's interpreter: (wall seconds, stderr); stdout is appended to ``stdout``."""
    begin = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE if stdout is not None else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
        cwd=str(REPO),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    elapsed = time.perf_counter() - begin
    if proc.returncode != 0:
        raise BenchError(f"python {' '.join(args)} failed:\n{err.decode(errors='replace')[-2000:]}")
    if stdout is not None:
        stdout.append(out.decode())
    return elapsed, err.decode(errors="replace")


async def sdk_imports() -> list[SdkImport]:
    found = []
    for module in SDK_MODULES:
        out: list[str] = []
        await _python("-c", _SDK_PROBE, module, stdout=out)
        probe = json.loads(out[0])
        found.append(SdkImport(module, bool(probe["sdk"]), float(probe["ms"]), int(probe["kib"])))
    return found


def parse_importtime(text: str) -> tuple[float, list[tuple[str, float]]]:
    """Cumulative ms of the ``broker`` import tree, and its self time by top-level package.

    ``-X importtime`` prints a module after everything it imported, indented by
    depth; every line since the previous top-level (depth 0) line belongs to the
    tree of the next top-level module.
    """
    total_us = 0
    by_package: dict[str, int] = {}
    block: list[tuple[str, int]] = []
    for line in text.splitlines():
        match = _IMPORTTIME.match(line)
        if match is None:
            continue
        self_us, cumulative = int(match.group(1)), int(match.group(2))
        depth, name = len(match.group(3)) // 2, match.group(4)
        block.append((name, self_us))
        if depth != 0:
            continue
        if name == "broker" or name.startswith("broker."):
            total_us += cumulative
            for module, us in block:
                package = module.split(".")[0]
                by_package[package] = by_package.get(package, 0) + us
        block = []
    heaviest = sorted(by_package.items(), key=lambda item: item[1], reverse=True)[:8]
    return total_us / 1000, [(name, us / 1000) for name, us in heaviest]


async def import_cost(repeats: int = 3) -> ImportCost:
    _, trace = await _python("-X", "importtime", "-c", f"import {IMPORT_TARGET}")
    total, heaviest = parse_importtime(trace)
    bare, loaded = [], []
    for _ in range(repeats):
        bare.append((await _python("-c", "pass"))[0])
        loaded.append((await _python("-c", f"import {IMPORT_TARGET}"))[0])
    wall = (statistics.median(loaded) - statistics.median(bare)) * 1000
    return ImportCost(importtime_ms=total, wall_ms=wall, heaviest=heaviest)


async def measure(
    google: FakeGoogle, workdir: Path, runs: int, progress: Callable[[str], None] = print
) -> StartupResult:
    result = StartupResult()
    cred = write_credentials(google, workdir)
    async with aiohttp.ClientSession() as session:
        for i in range(runs):
            run = await one_run(session, cred, workdir / f"broker-startup-{i}.log")
            result.runs.append(run)
            progress(
                f"  run {i + 1}/{runs}: ready in {run.ready_seconds:.3f} s, RSS {run.rss_kib / 1024:.1f} MiB"
            )
    result.imports = await import_cost()
    result.sdks = await sdk_imports()
    return result

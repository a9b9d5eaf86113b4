"""Cached-token throughput and latency under wrk, against a same-run aiohttp baseline.

The broker runs as its own process (``python -m broker run``) against the fakes
served by this process; the baseline is ``bench.baseline_server`` returning a
JSON body of the same size. Both are pinned to core 0 and wrk to core 1 when
``taskset`` is available. Each server is warmed, then for every connection count
the baseline and the broker are measured back to back with identical wrk runs
(several rounds at the target connection count; figures are medians over rounds).

Around every run the server's own CPU time (``/proc/PID/stat``) and its core's
busy time (``/proc/stat``) are read, giving server CPU per request and how busy
the core was with *other* work: on a shared machine that is the noise to know.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from bench.common import (
    BenchError,
    Child,
    broker_cmd,
    free_port,
    pinned,
    started,
    wait_ok,
    write_credentials,
)
from bench.wire import FLAVOR, LOOPBACK, TOKEN_PATH
from broker.fakes import FakeGoogle

if TYPE_CHECKING:
    from bench.profile import Profile

SERVER_CORE = 0
WRK_CORE = 1
WRK_GRACE = 30.0  # seconds beyond -d before a wrk run is killed
NOISY_PCT = 10.0  # other load (server's or wrk's core) above which a pair counts as noisy

# wrk's --latency table stops at 99%; the done() hook reports 99.9% and the error counts.
LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d "
    .. "p50_us=%d p99_us=%d p999_us=%d max_us=%d\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


@dataclass
class WrkRun:
    server: str
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    errors: dict[str, int]
    round: int = 1
    server_cpu_pct: float | None = None  # server process CPU over the run, % of one core
    cpu_us_per_req: float | None = None  # server CPU time per completed request
    other_load_pct: float | None = None  # busy time on the server's core not spent by the server
    wrk_other_load_pct: float | None = None  # busy time on wrk's core not spent by wrk
    discarded: bool = False  # re-measured because the pair was noisy; kept for the record only

    @property
    def noise(self) -> float:
        """The larger of the two 'other load' figures, 0 when unknown."""
        return max(self.other_load_pct or 0.0, self.wrk_other_load_pct or 0.0)

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Summary:
    """Median over the rounds of one server at one connection count."""

    server: str
    connections: int
    runs: list[WrkRun]

    def med(self, name: str) -> float:
        values = [getattr(r, name) for r in self.runs if getattr(r, name) is not None]
        return _median(values)


@dataclass
class ThroughputResult:
    body_size: int = 0
    pinned: bool = False
    duration: float = 0.0
    runs: list[WrkRun] = field(default_factory=list)
    broker_rss_kib_before: int = 0
    broker_rss_kib_after: int = 0
    load_before: str = ""
    load_after: str = ""
    errors: list[str] = field(default_factory=list)
    profiles: dict[str, Profile] = field(default_factory=dict)
    quiet_waited: float = 0.0

    def summary(self, server: str, connections: int) -> Summary | None:
        runs = [r for r in self.kept() if r.server == server and r.connections == connections]
        return Summary(server, connections, runs) if runs else None

    def ratio(self, connections: int) -> float:
        """Median over rounds of broker req/s / baseline req/s, each pair measured back to back."""
        ratios = []
        for broker in (r for r in self.kept() if r.server == "broker" and r.connections == connections):
            base = next(
                (
                    r
                    for r in self.kept()
                    if r.server == "baseline" and r.connections == connections and r.round == broker.round
                ),
                None,
            )
            if base is not None and base.rps:
                ratios.append(broker.rps / base.rps)
        return _median(ratios)

    def kept(self) -> list[WrkRun]:
        return [r for r in self.runs if not r.discarded]

    def connection_counts(self) -> list[int]:
        return sorted({r.connections for r in self.runs})


@dataclass(frozen=True)
class _Reading:
    wall: float
    server_cpu: float  # seconds of CPU used by the server process so far
    wrk_cpu: float  # seconds of CPU used by reaped children (wrk) so far
    cores: dict[int, tuple[float, float]]  # core -> (busy, total) seconds


class CpuMeter:
    """Server-process CPU, wrk CPU and per-core busy time between two readings (Linux /proc).

    wrk's CPU comes from this process's ``RUSAGE_CHILDREN``, which grows when the
    wrk child is reaped; nothing else exits during a measured run.
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int, server_core: int | None, wrk_core: int | None) -> None:
        self.pid, self.server_core, self.wrk_core = pid, server_core, wrk_core

    def read(self) -> _Reading:
        stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        server = (int(stat[11]) + int(stat[12])) / self.TICK  # utime + stime
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cores: dict[int, tuple[float, float]] = {}
        wanted = {c for c in (self.server_core, self.wrk_core) if c is not None}
        for line in Path("/proc/stat").read_text().splitlines():
            name = line.split(" ", 1)[0]
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in wanted:
                ticks = [int(v) for v in line.split()[1:9]]
                total = sum(ticks) / self.TICK
                cores[int(name[3:])] = (
                    total - (ticks[3] + ticks[4]) / self.TICK,
                    total,
                )  # minus idle, iowait
        return _Reading(time.perf_counter(), server, usage.ru_utime + usage.ru_stime, cores)

    def apply(self, run: WrkRun, before: _Reading, after: _Reading) -> None:
        wall = after.wall - before.wall
        cpu = after.server_cpu - before.server_cpu
        if wall <= 0 or not run.requests:
            return
        run.server_cpu_pct = 100 * cpu / wall
        run.cpu_us_per_req = 1e6 * cpu / run.requests
        run.other_load_pct = self._other(self.server_core, before, after, run.server_cpu_pct)
        wrk_pct = 100 * (after.wrk_cpu - before.wrk_cpu) / wall
        run.wrk_other_load_pct = self._other(self.wrk_core, before, after, wrk_pct)

    @staticmethod
    def _other(core: int | None, before: _Reading, after: _Reading, own_pct: float) -> float | None:
        if core is None or core not in before.cores or core not in after.cores:
            return None
        total = after.cores[core][1] - before.cores[core][1]
        if total <= 0:
            return None
        busy_pct = 100 * (after.cores[core][0] - before.cores[core][0]) / total
        return max(0.0, busy_pct - own_pct)


class QuietGate:
    """Before each baseline/broker pair, wait for the machine to be idle, within a total budget.

    Between runs our own servers and wrk are idle, so whatever keeps the CPUs busy
    then is someone else's work that would skew the next pair. The wait is bounded
    by ``budget`` seconds over the whole benchmark; once spent, runs go ahead
    regardless and the per-run *other load* column tells how noisy they were.
    """

    WINDOW = 0.5

    def __init__(self, budget: float, threshold_pct: float = 10.0) -> None:
        self.remaining = budget
        self.threshold = threshold_pct
        self.waited = 0.0

    @staticmethod
    def _ticks() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]

    async def wait(self) -> float:
        """Return the machine busy % of the last window (0-100, all cores)."""
        busy = 0.0
        while True:
            total0, idle0 = self._ticks()
            await asyncio.sleep(self.WINDOW)
            total1, idle1 = self._ticks()
            if total1 > total0:
                busy = 100 * (1 - (idle1 - idle0) / (total1 - total0))
            if busy <= self.threshold or self.remaining <= 0:
                return busy
            self.remaining -= self.WINDOW
            self.waited += self.WINDOW


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _to_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise BenchError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(server: str, connections: int, seconds: float, output: str) -> WrkRun:
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.M)
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", output, re.M))
    lua = re.search(r"^BENCH (.*)$", output, re.M)
    if rps is None or lua is None or len(dist) != 4:
        raise BenchError(f"unexpected wrk output:\n{output}")
    fields = {k: int(v) for k, v in (item.split("=") for item in lua.group(1).split())}
    return WrkRun(
        server=server,
        connections=connections,
        seconds=fields["duration_us"] / 1e6,
        requests=fields["requests"],
        rps=float(rps.group(1)),
        p50_ms=_to_ms(dist["50"]),
        p75_ms=_to_ms(dist["75"]),
        p90_ms=_to_ms(dist["90"]),
        p99_ms=_to_ms(dist["99"]),
        p999_ms=fields["p999_us"] / 1000,
        max_ms=fields["max_us"] / 1000,
        errors={k: fields[k] for k in ("connect", "read", "write", "status", "timeout")},
    )


async def run_wrk(
    server: str, url: str, connections: int, seconds: float, lua: Path, core: int | None
) -> WrkRun:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed")
    duration = max(1, round(seconds))
    cmd = pinned(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-H",
            "Metadata-Flavor: Google",
            "-s",
            str(lua),
            url,
        ],
        core,
    )
    return await wrk_result(cmd, server, connections, duration)


async def wrk_result(cmd: list[str], server: str, connections: int, duration: int) -> WrkRun:
    """Run a wrk command line (``duration`` seconds of load) and parse what it printed."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), duration + WRK_GRACE)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}:\n{text}")
    return parse_wrk(server, connections, duration, text)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


async def _body_size(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url, headers=FLAVOR) as resp:
        body = await resp.read()
        if resp.status != 200 or b'"access_token"' not in body:
            raise BenchError(f"{url} answered {resp.status}: {body[:200]!r}")
        if resp.content_type != "application/json":
            raise BenchError(f"{url} answered {resp.content_type}, not application/json")
        return len(body)


async def measure(
    google: FakeGoogle,
    workdir: Path,
    connections: list[int],
    seconds: float,
    warmup: float,
    pin: bool,
    rounds: int = 1,
    rounds_at: int = 32,
    profile_seconds: float | None = None,
    quiet_budget: float = 0.0,
    reruns: int = 0,
    progress: Callable[[str], None] = print,
) -> ThroughputResult:
    result = ThroughputResult(pinned=pin, duration=seconds)
    server_core, wrk_core = (SERVER_CORE, WRK_CORE) if pin else (None, None)
    lua = workdir / "percentiles.lua"
    lua.write_text(LUA)
    cred = write_credentials(google, workdir)
    broker_port, admin_port, base_port = free_port(), free_port(), free_port()
    broker_url = f"http://{LOOPBACK}:{broker_port}{TOKEN_PATH}"
    base_url = f"http://{LOOPBACK}:{base_port}{TOKEN_PATH}"
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        broker = await stack.enter_async_context(
            started(
                "broker",
                pinned(broker_cmd(cred, broker_port, admin_port), server_core),
                workdir / "broker-throughput.log",
            )
        )
        await wait_ok(session, broker, f"http://{LOOPBACK}:{admin_port}/readyz")
        result.body_size = await _body_size(session, broker_url)
        baseline_cmd = [
            sys.executable,
            "-m",
            "bench.baseline_server",
            "--port",
            str(base_port),
            "--body-size",
            str(result.body_size),
        ]
        baseline = await stack.enter_async_context(
            started("baseline", pinned(baseline_cmd, server_core), workdir / "baseline.log")
        )
        await wait_ok(session, baseline, base_url)
        if (size := await _body_size(session, base_url)) != result.body_size:
            raise BenchError(f"baseline body is {size} bytes, broker's {result.body_size}")
        result.broker_rss_kib_before = broker.status_kib("VmRSS")
        servers: list[tuple[str, Child, str]] = [
            ("baseline", baseline, base_url),
            ("broker", broker, broker_url),
        ]
        for name, _child, url in servers:
            progress(f"  warm-up {name}: {warmup:.0f}s at 32 connections")
            await run_wrk(name, url, 32, warmup, lua, wrk_core)
        result.load_before = _loadavg()
        gate = QuietGate(quiet_budget)
        reruns_left = reruns
        for conns in connections:
            for round_no in range(1, (rounds if conns == rounds_at else 1) + 1):
                while True:
                    await gate.wait()
                    pair = []
                    for name, child, url in servers:
                        meter = CpuMeter(child.pid, server_core, wrk_core)
                        before = meter.read()
                        run = await run_wrk(name, url, conns, seconds, lua, wrk_core)
                        meter.apply(run, before, meter.read())
                        run.round = round_no
                        if not child.alive():
                            raise BenchError(f"{name} died during the run:\n{child.log_tail()}")
                        pair.append(run)
                        progress(
                            f"  {name:8} c={conns:<4} r{round_no} {run.rps:>9,.0f} req/s  "
                            f"p50 {run.p50_ms:.2f}  p99 {run.p99_ms:.2f}  p99.9 {run.p999_ms:.2f} ms  "
                            f"cpu {run.server_cpu_pct or 0:.0f}% {run.cpu_us_per_req or 0:.0f} us/req  "
                            f"other load {_pct(run.other_load_pct)}/{_pct(run.wrk_other_load_pct)}  "
                            f"errors {run.error_total}"
                        )
                        if run.error_total:
                            result.errors.append(f"{name} at {conns} connections: wrk errors {run.errors}")
                    result.runs.extend(pair)
                    noisy = any(r.noise > NOISY_PCT for r in pair)
                    if not noisy or reruns_left <= 0 or conns != rounds_at:
                        break
                    reruns_left -= 1
                    for r in pair:
                        r.discarded = True
                    progress(f"  noisy pair (other load > {NOISY_PCT:g}%): measuring it again")
        result.load_after = _loadavg()
        result.quiet_waited = gate.waited
        result.broker_rss_kib_after = broker.status_kib("VmRSS")
        if profile_seconds:
            from bench import profile

            for name, child, url in servers:
                await gate.wait()
                progress(f"  profiling {name} with py-spy: {profile_seconds:.0f}s at 32 connections")
                result.profiles[name] = await profile.record(
                    name, child.pid, url, profile_seconds, lua, wrk_core, workdir
                )
    return result

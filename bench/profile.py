"""Optional (``--profile``): where the servers' CPU goes while serving the token reply.

py-spy samples the baseline and then the broker during one extra wrk run each
at 32 connections (same pinning as the throughput runs). Only the event-loop
thread's samples count; idle executor threads are left out. Shares are of those
samples; the report scales them by each server's measured CPU time per request,
so the broker's extra cost can be read bucket by bucket against the baseline's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BenchError
from bench.throughput import WRK_GRACE, run_wrk

RATE = 200  # samples per second
_LOOP_FRAME = "run_forever (asyncio/base_events.py"
_FRAME = re.compile(r"^(?P<func>.+) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass
class Profile:
    samples: int = 0
    rps: float = 0.0
    self_top: list[tuple[str, float]] = field(default_factory=list)  # (function (file), share)
    inclusive_top: list[tuple[str, float]] = field(default_factory=list)
    broker_inclusive: list[tuple[str, float]] = field(default_factory=list)
    groups: list[tuple[str, float]] = field(default_factory=list)


# Exclusive-ish buckets, first match wins, tested from the leaf up.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Prometheus counters", ("prometheus_client/", "broker/metrics.py")),
    ("json.dumps of the token reply", ("json/",)),
    ("ScopeSet.parse / ScopeSet.of", ("ScopeSet.",)),
    ("Token cache lookup (TokenCache.get, clock)", ("TokenCache.", "broker/clock.py", "TokenChain.")),
    ("App middlewares + handlers (own lines)", ("broker/metadata/", "bench/baseline_server.py")),
    ("aiohttp URL routing", ("web_urldispatcher.py",)),
    ("Socket send (transport.write → send())", ("_SelectorSocketTransport.write",)),
    ("Socket read + HTTP parse", ("_read_ready", "data_received")),
    ("aiohttp response headers + write", ("web_response.py", "http_writer.py")),
    ("aiohttp request/handler plumbing", ("aiohttp/",)),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
)


def _key(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "python3.11/", "lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


def analyse(raw: str) -> Profile:
    stacks: list[tuple[list[str], int]] = []
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(_LOOP_FRAME in f for f in frames):
            stacks.append(([_key(f) for f in frames], int(count)))
    total = sum(n for _, n in stacks)
    if not total:
        raise BenchError("py-spy recorded no samples of the server's event loop")
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        groups[_group(frames)] += n
    share = {k: v / total for k, v in inclusive.items()}
    wrappers = {k for k, v in share.items() if v > 0.9}  # runpy, cli, asyncio.run, run_forever...
    return Profile(
        samples=total,
        self_top=[(k, v / total) for k, v in own.most_common(15)],
        inclusive_top=[(k, v) for k, v in sorted(share.items(), key=lambda kv: -kv[1]) if k not in wrappers][
            :15
        ],
        broker_inclusive=[
            (k, v)
            for k, v in sorted(share.items(), key=lambda kv: -kv[1])
            if "(broker/" in k and k not in wrappers
        ][:12],
        groups=[(k, v / total) for k, v in groups.most_common()],
    )


def _group(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in GROUPS:
            if any(n in frame for n in needles):
                return name
    return "other"


async def record(
    server: str, pid: int, url: str, seconds: float, lua: Path, wrk_core: int | None, workdir: Path
) -> Profile:
    spy = shutil.which("py-spy")
    if spy is None:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    out = workdir / f"{server}-profile.raw"
    duration = max(2, round(seconds))
    load = asyncio.create_task(run_wrk(server, url, 32, duration + 2, lua, wrk_core))
    try:
        await asyncio.sleep(1)
        proc = await asyncio.create_subprocess_exec(
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration),
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--output",
            str(out),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            text, _ = await asyncio.wait_for(proc.communicate(), duration + WRK_GRACE)
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0 or not out.exists():
            raise BenchError(f"py-spy failed ({proc.returncode}): {text.decode(errors='replace')[-1000:]}")
        run = await load
    finally:
        if not load.done():
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError, BenchError):
                await load
    profile = analyse(out.read_text())
    profile.rps = run.rps
    return profile

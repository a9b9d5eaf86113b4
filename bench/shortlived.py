"""Short-lived processes: one token per process, through the broker vs straight from the file.

Every fake upstream answers after ``delay`` (50 ms by default), as a real STS or
IAM round trip would cost at least. Each invocation is a fresh process with a
fresh config directory, as in a new container or a CI step:

* ``gcloud auth print-access-token``: through the broker (``GCE_METADATA_*``
  pointing at it), or directly with ``CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE`` =
  the external_account file (gcloud's google-auth does STS + IAM itself);
* Python ``google.auth.default()`` + ``refresh()``: through the broker, or with
  ``GOOGLE_APPLICATION_CREDENTIALS`` = the same file (``GOOGLE_CLOUD_PROJECT``
  is set in that case only, so google-auth does not look the project up on the
  internet).

The broker is warm (the default token cached), which is its steady state. The
invocations alternate between the two modes; medians are reported, plus the
bare start-up cost of each client (``gcloud --version``; an interpreter that
imports google.auth), which neither mode can avoid.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import child_env
from bench.rig import Rig, rig

PY_TOKEN = """
import google.auth
from google.auth.transport.requests import Request
creds, project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
creds.refresh(Request())
assert creds.token
print(type(creds).__module__, project)
"""
PY_FLOOR = "import google.auth, google.auth.transport.requests"
GCLOUD_QUIET = {
    "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
    "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
}
RUN_LIMIT = 120.0


@dataclass
class Series:
    client: str
    mode: str  # "broker", "direct" or "floor"
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # the client's user + system time
    failures: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        """First and third quartile of the wall times."""
        if len(self.seconds) < 4:
            return (min(self.seconds, default=float("nan")), max(self.seconds, default=float("nan")))
        q = statistics.quantiles(self.seconds, n=4)
        return q[0], q[2]


@dataclass
class ShortLivedResult:
    runs: int
    delay: float
    series: list[Series] = field(default_factory=list)
    upstream_calls: dict[tuple[str, str], int] = field(default_factory=dict)  # (client, mode) -> STS+IAM
    skipped: list[str] = field(default_factory=list)

    def get(self, client: str, mode: str) -> Series | None:
        return next((s for s in self.series if s.client == client and s.mode == mode), None)

    def speedup(self, client: str) -> float:
        broker, direct = self.get(client, "broker"), self.get(client, "direct")
        if broker is None or direct is None or not broker.seconds or not direct.seconds:
            return float("nan")
        return direct.median / broker.median

    @property
    def passed(self) -> bool:
        return all(not s.failures for s in self.series)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (this process's reaped children: runs are sequential), status, output."""
    cpu_before = _children_cpu()
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_LIMIT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return time.perf_counter() - began, 0.0, -1, "timed out"
    seconds = time.perf_counter() - began
    cpu = _children_cpu() - cpu_before
    return seconds, cpu, proc.returncode or 0, (out + err).decode(errors="replace")[-600:]


def _broker_env(r: Rig, config: Path) -> dict[str, str]:
    env = child_env()
    host = f"127.0.0.1:{r.port}"
    env.update(
        GCE_METADATA_HOST=host,
        GCE_METADATA_IP=host,
        GCE_METADATA_ROOT=host,
        CLOUDSDK_CONFIG=str(config),
        **GCLOUD_QUIET,
    )
    return env


def _direct_env(r: Rig, config: Path) -> dict[str, str]:
    env = child_env()
    env.update(
        CLOUDSDK_CONFIG=str(config),
        CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE=str(r.cred_file),
        CLOUDSDK_CORE_PROJECT="wif-broker-demo",
        GOOGLE_APPLICATION_CREDENTIALS=str(r.cred_file),
        GOOGLE_CLOUD_PROJECT="wif-broker-demo",
        **GCLOUD_QUIET,
    )
    return env


async def measure(
    workdir: Path, runs: int, delay: float, progress: Callable[[str], None] = print
) -> ShortLivedResult:
    result = ShortLivedResult(runs, delay)
    gcloud = shutil.which("gcloud")
    clients: list[tuple[str, list[str], list[str] | None]] = [
        ("python google-auth", [sys.executable, "-c", PY_TOKEN], [sys.executable, "-c", PY_FLOOR]),
    ]
    if gcloud is None:
        result.skipped.append("gcloud is not installed: its rows are missing")
    else:
        clients.insert(
            0,
            ("gcloud auth print-access-token", [gcloud, "auth", "print-access-token"], [gcloud, "--version"]),
        )
    async with rig(workdir / "shortlived", delay=delay) as r:
        # google-auth sends the file's content verbatim: no trailing newline (the broker strips it).
        r.rotate_subject_token()
        for client, argv, floor in clients:
            series = {mode: Series(client, mode) for mode in ("broker", "direct", "floor")}
            result.series.extend(series.values())
            for i in range(runs):
                for mode in ("broker", "direct") if i % 2 == 0 else ("direct", "broker"):
                    with tempfile.TemporaryDirectory(prefix="wif-bench-cfg-") as config:
                        env = (_broker_env if mode == "broker" else _direct_env)(r, Path(config))
                        calls_before = len(r.google.sts.calls) + len(r.google.iam.calls)
                        seconds, cpu, code, output = await _timed(argv, env)
                        calls = len(r.google.sts.calls) + len(r.google.iam.calls) - calls_before
                        key = (client, mode)
                        result.upstream_calls[key] = result.upstream_calls.get(key, 0) + calls
                    if code != 0:
                        series[mode].failures.append(output)
                        continue
                    series[mode].seconds.append(seconds)
                    series[mode].cpu_seconds.append(cpu)
                if floor is not None:
                    with tempfile.TemporaryDirectory(prefix="wif-bench-cfg-") as config:
                        env = _direct_env(r, Path(config))
                        seconds, cpu, code, output = await _timed(floor, env)
                    if code == 0:
                        series["floor"].seconds.append(seconds)
                        series["floor"].cpu_seconds.append(cpu)
            progress(
                f"  {client}: broker {series['broker'].median * 1000:.0f} ms, "
                f"direct {series['direct'].median * 1000:.0f} ms, floor "
                f"{series['floor'].median * 1000:.0f} ms "
                f"(medians of {runs}); failures "
                f"{len(series['broker'].failures)}/{len(series['direct'].failures)}"
            )
    return result

"""Plumbing shared by the benchmarks: ports, child processes, credentials, machine facts."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.wire import LOOPBACK
from broker.fakes import DEFAULT_AUDIENCE, FakeGoogle

STOP_SECONDS = 12.0  # the broker drains within 10 s of SIGTERM (SPEC §3)
REPO = Path(__file__).resolve().parents[1]

# Keys that would change what a child broker does; the bench controls them all.
_SCRUBBED_PREFIXES = ("WIF_BROKER_", "GCE_METADATA", "CLOUDSDK_", "AWS_", "AZURE_")
_SCRUBBED_KEYS = ("GOOGLE_APPLICATION_CREDENTIALS", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


class BenchError(Exception):
    """A benchmark could not produce a valid figure."""


def free_port() -> int:
    """An unused loopback port (the usual bind-to-0 probe; tiny race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_SCRUBBED_PREFIXES) and key not in _SCRUBBED_KEYS
    }
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


def write_credentials(google: FakeGoogle, directory: Path) -> Path:
    """An external_account file pointing at the running fakes (as ``wif-broker demo`` writes)."""
    token_file = directory / "subject-token"
    token_file.write_text(google.subject_token(lifetime_seconds=7200) + "\n")
    cred_file = directory / "credentials.json"
    cred_file.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": DEFAULT_AUDIENCE,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": google.token_url,
                "service_account_impersonation_url": google.impersonation_url(),
                "credential_source": {"file": str(token_file), "format": {"type": "text"}},
            },
            indent=2,
        )
    )
    return cred_file


def broker_cmd(cred_file: Path, port: int, admin_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "broker",
        "run",
        "--credentials",
        str(cred_file),
        "--listen",
        f"{LOOPBACK}:{port}",
        "--admin-listen",
        f"{LOOPBACK}:{admin_port}",
        "--log-level",
        "warning",
    ]


def can_pin() -> bool:
    """True when taskset exists and this process may use at least cores 0 and 1."""
    try:
        cores = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return False
    return shutil.which("taskset") is not None and {0, 1} <= cores


def pinned(cmd: Sequence[str], core: int | None) -> list[str]:
    # taskset execs the command, so the child's PID stays the program's own.
    return ["taskset", "-c", str(core), *cmd] if core is not None else list(cmd)


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path
    started: float  # time.perf_counter() just before the spawn

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.returncode is None

    def status_kib(self, field: str) -> int:
        """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise BenchError(f"{field} missing from /proc/{self.pid}/status")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


async def spawn(name: str, cmd: Sequence[str], log: Path) -> Child:
    with log.open("wb") as sink:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(),
            cwd=str(REPO),
        )
    return Child(name, proc, log, started)


async def wait_ok(
    session: aiohttp.ClientSession,
    child: Child,
    url: str,
    *,
    within: float = 15.0,
    headers: Mapping[str, str] | None = None,
    interval: float = 0.005,
) -> float:
    """Poll ``url`` until it answers 200; return the perf_counter time it did."""
    deadline = time.perf_counter() + within
    probe = aiohttp.ClientTimeout(total=1.0)
    while time.perf_counter() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, headers=headers, timeout=probe) as resp:
                await resp.read()
                if resp.status == 200:
                    return time.perf_counter()
        await asyncio.sleep(interval)
    raise BenchError(f"{child.name} not ready at {url} within {within:.0f}s:\n{child.log_tail()}")


@contextlib.asynccontextmanager
async def started(name: str, cmd: Sequence[str], log: Path) -> AsyncIterator[Child]:
    child = await spawn(name, cmd, log)
    try:
        yield child
    finally:
        await child.stop()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine_info() -> dict[str, str]:
    import aiohttp as aiohttp_module

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    distro = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "os": f"{distro or platform.system()} (kernel {platform.release()})",
        "python": platform.python_version() + f" ({platform.python_implementation()})",
        "aiohttp": aiohttp_module.__version__,
        "wrk": wrk_version(),
    }


def wrk_version() -> str:
    path = shutil.which("wrk")
    if path is None:
        return "missing"
    import subprocess

    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "unknown"


def write_report(
    res: Any,
    path: Path,
    with_plots: bool,
    markdown: Callable[[Any], str],
    plots: Callable[[Any, Path], list[str]],
) -> list[str]:
    """Write ``markdown(res)`` to ``path`` after drawing ``plots(res, folder)`` next to it
    (their names go to ``res.plots``); return notices for the console. A plot is
    optional, so a failure to draw one is a notice, not an error."""
    notices = []
    path.parent.mkdir(parents=True, exist_ok=True)
    res.plots = []
    if with_plots:
        try:
            res.plots = plots(res, path.parent)
        except Exception as exc:
            notices.append(f"plots skipped: {type(exc).__name__}: {exc}")
        if not res.plots and not notices:
            notices.append("plots skipped: matplotlib is not installed")
    path.write_text(markdown(res))
    return notices


def wrk_missing() -> bool:
    """True, after saying so on stderr, when wrk is not on PATH."""
    if shutil.which("wrk") is not None:
        return False
    print(
        "bench: wrk is not installed; the throughput benchmark needs it "
        "(Debian: apt-get install -y wrk). Nothing was measured.",
        file=sys.stderr,
    )
    return True

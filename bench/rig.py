"""The resilience benchmarks' set-up: in-process fakes, a broker process, its metrics.

``python -m bench.instrumented run`` (the broker CLI plus a task-count gauge)
against a FakeGoogle served by the bench process, with the token lifetime,
upstream latency and broker flags each benchmark asks for. Loopback only.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.common import Child, free_port, pinned, started, wait_ok, write_credentials
from bench.wire import LOOPBACK, TOKEN_PATH
from broker.fakes import FakeGoogle


@dataclass
class Rig:
    google: FakeGoogle
    broker: Child
    port: int
    admin_port: int
    token_file: Path
    cred_file: Path

    @property
    def token_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}{TOKEN_PATH}"

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def rotate_subject_token(self, lifetime_seconds: int = 7200) -> None:
        """Write a fresh subject token atomically, as the kubelet would."""
        staging = self.token_file.with_suffix(".new")
        staging.write_text(self.google.subject_token(lifetime_seconds=lifetime_seconds))
        os.replace(staging, self.token_file)


def broker_argv(cred: Path, port: int, admin_port: int, extra: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.instrumented",
        "run",
        "--credentials",
        str(cred),
        "--listen",
        f"{LOOPBACK}:{port}",
        "--admin-listen",
        f"{LOOPBACK}:{admin_port}",
        "--log-level",
        "warning",
        *extra,
    ]


@contextlib.asynccontextmanager
async def rig(
    workdir: Path,
    *,
    lifetime: int = 3600,
    delay: float = 0.0,
    broker_flags: Sequence[str] = (),
    core: int | None = None,
    name: str = "broker",
) -> AsyncIterator[Rig]:
    async with FakeGoogle(lifetime_seconds=lifetime) as google:
        google.sts.delay_seconds = google.iam.delay_seconds = delay
        cred = _prepare(google, workdir)
        port, admin_port = free_port(), free_port()
        argv = pinned(broker_argv(cred, port, admin_port, broker_flags), core)
        async with started(name, argv, workdir / f"{name}.log") as child:
            async with aiohttp.ClientSession() as session:
                await wait_ok(session, child, f"http://{LOOPBACK}:{admin_port}/readyz", within=30)
            yield Rig(google, child, port, admin_port, workdir / "subject-token", cred)


def _prepare(google: FakeGoogle, workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    return write_credentials(google, workdir)


async def scrape(session: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    """The broker's /metrics as {name or name{k=v,...}: value}."""
    async with session.get(admin_url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        text = await resp.text()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values

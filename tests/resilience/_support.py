"""Shared by the resilience tests: brokers on a driven clock, fault switches, small clients.

Faults are injected in the fakes (``fail_next``, ``gate``, stopped servers); the
broker is the production ``daemon.serve`` unless a test needs a shorter outbound
timeout, in which case :func:`serve_chain` builds the same metadata app around a
``TokenChain`` whose session carries that timeout (no broker code is patched).
Every wait is bounded in real time; no assertion is about how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from broker import metrics, settings
from broker.chain import TokenChain
from broker.clock import Clock, ManualClock, SystemClock
from broker.fakes import FakeGoogle
from broker.fakes._service import FakeService
from broker.metadata import listener
from broker.metadata.app import create_metadata_app
from broker.sources import build_source
from tests.conftest import PROJECT, RunningBroker, credential_info, run_broker

MF = {"Metadata-Flavor": "Google"}
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
WAIT = 30.0  # real seconds any single wait may take, generous for a loaded 2-core machine
POLICY_BACKOFF_CAP = 30.0  # broker.cache.Policy().backoff_cap, which TokenChain uses
MIN_SERVE_TTL = 300  # the settings default
LIFETIME = 3600  # the fakes' default token lifetime
STS_503 = {"error": "unavailable", "error_description": "The service is currently unavailable."}
IAM_503 = {
    "error": {"code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE"}
}


@dataclass(frozen=True)
class Answer:
    status: int
    text: str
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def access_token(self) -> str:
        return str(self.json()["access_token"]) if self.status == 200 else ""

    @property
    def expires_in(self) -> int:
        return int(self.json()["expires_in"])


async def get(url: str, headers: dict[str, str] | None = None, **params: str) -> Answer:
    timeout = aiohttp.ClientTimeout(total=WAIT * 2)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, headers=MF if headers is None else headers, params=params) as resp,
    ):
        return Answer(resp.status, await resp.text(), dict(resp.headers))


async def token(base_url: str, **params: str) -> Answer:
    return await get(base_url + TOKEN_PATH, **params)


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, within: float = WAIT) -> None:
    """Poll ``condition`` in real time until it holds; fail with ``what`` otherwise."""
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110 - polls HTTP state, not an event
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {within:.0f}s") from None


async def readiness(broker: RunningBroker) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(broker.admin_url + "/readyz") as resp:
        body = await resp.json()
        return resp.status, str(body["reason"])


async def until_ready(broker: RunningBroker) -> None:
    """Wait for the start-up pre-warm (real HTTP to the fakes, whatever the clock)."""

    async def ready() -> bool:
        return (await readiness(broker))[0] == 200

    await eventually(ready, "the broker never became ready")


@contextlib.asynccontextmanager
async def ready_broker(resolved: settings.Settings, **kwargs: Any) -> AsyncIterator[RunningBroker]:
    """``run_broker`` that yields once the pre-warm has cached the default token."""
    async with run_broker(resolved, **kwargs) as broker:
        await until_ready(broker)
        yield broker


def upstream_calls(upstream: str, outcome: str) -> float:
    """The broker's own count of finished calls to ``upstream`` (process-wide, use deltas)."""
    value = metrics.REGISTRY.get_sample_value(
        "wif_broker_upstream_requests_total", {"upstream": upstream, "outcome": outcome}
    )
    return value or 0.0


def stale_served(kind: str = "access") -> float:
    value = metrics.REGISTRY.get_sample_value("wif_broker_stale_tokens_served_total", {"kind": kind})
    return value or 0.0


class Outage:
    """A fake answering every request with ``status`` until :meth:`end`.

    ``fail_next`` queues canned answers; a long outage queues plenty and ending it
    drops what is left (``recover``).
    """

    def __init__(self, fake: FakeService, status: int, body: dict[str, Any] | str, **kwargs: Any) -> None:
        self.fake = fake
        self.calls_before = len(fake.calls)
        fake.fail_next(status, body, count=1_000_000, **kwargs)

    @property
    def calls(self) -> int:
        """Requests the fake received since the outage began."""
        return len(self.fake.calls) - self.calls_before

    @property
    def first_call_at(self) -> float:
        """The fake's clock at the first request the outage answered."""
        return self.fake.calls[self.calls_before].at

    def end(self) -> None:
        self.fake.recover()


def write_settings(
    tmp_path: Path,
    google: FakeGoogle,
    token_path: Path | None = None,
    *,
    impersonate: bool = True,
    **flags: Any,
) -> settings.Settings:
    """A credential file for ``google`` (subject token minted at the fakes' now) and settings."""
    if token_path is None:
        token_path = tmp_path / "subject-token"
        token_path.write_text(google.subject_token(lifetime_seconds=7200))
    cred = tmp_path / "credentials.json"
    cred.write_text(json.dumps(credential_info(google, token_path, impersonate=impersonate)))
    merged: dict[str, Any] = {
        "credentials": str(cred),
        "listen": ["127.0.0.1:0"],
        "admin_listen": "127.0.0.1:0",
        "zone": "us-central1-a",
        "project_id": PROJECT,
        **flags,
    }
    return settings.build(merged, environ={})


async def step_until(
    clock: ManualClock, seconds: float, condition: Callable[[], Awaitable[bool]], *, limit: float
) -> float:
    """Advance ``clock`` by ``seconds`` at a time until ``condition`` holds; return the time it took.

    Each step does real HTTP (the condition), so loads started by the step get to
    finish; fails once ``limit`` simulated seconds pass without the condition.
    """
    start = clock.wall()
    while not await condition():
        if clock.wall() - start >= limit:
            raise AssertionError(f"condition still false after {limit:.0f} simulated seconds")
        await clock.advance(seconds)
    return clock.wall() - start


@contextlib.asynccontextmanager
async def serve_chain(
    resolved: settings.Settings,
    session: aiohttp.ClientSession,
    clock: Clock | None = None,
    limits: listener.Limits | None = None,
) -> AsyncIterator[str]:
    """The metadata app over a TokenChain that uses ``session`` (e.g. a short ClientTimeout).

    Same app factory, chain and source builder as the daemon; only the outbound
    session differs. With ``limits``, behind the daemon's runner class holding them.
    Yields the base URL.
    """
    clock = clock or SystemClock()
    source = build_source(resolved.cred, session, environ={})
    chain = TokenChain(resolved, source, session, clock)
    app = create_metadata_app(resolved, chain, clock)
    runner = (
        web.AppRunner(app, access_log=None)
        if limits is None
        else listener.GuardedRunner(app, limits=limits, access_log=None)
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
        await chain.close()


def kubelet_token_dir(directory: Path, content: str) -> Path:
    """A projected-token volume as the kubelet lays it out; returns the ``token`` path.

    ``token -> ..data/token`` and ``..data -> ..<version>``; rotation swaps ``..data``
    atomically (:func:`kubelet_rotate`), removal of ``..data`` is the gap a
    non-atomic writer or a volume remount leaves.
    """
    directory.mkdir(parents=True, exist_ok=True)
    kubelet_rotate(directory, content, version=0)
    link = directory / "token"
    link.symlink_to(Path("..data") / "token")
    return link


def kubelet_rotate(directory: Path, content: str, *, version: int) -> None:
    versioned = directory / f"..v{version}"
    versioned.mkdir()
    (versioned / "token").write_text(content)
    staging = directory / "..data_tmp"
    staging.symlink_to(versioned.name)
    os.replace(staging, directory / "..data")

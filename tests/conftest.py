"""Shared fixtures: real fake upstreams, a real broker, and isolation helpers.

Tests patch only the environment and the clock. The broker runs the production
``daemon.serve`` in the test's event loop on ephemeral loopback ports, so real
clients in subprocesses (gcloud, google-auth) can talk to it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker import daemon, settings
from broker.fakes import DEFAULT_AUDIENCE, DEFAULT_SERVICE_ACCOUNT, FakeGoogle

IN_CI = os.environ.get("CI") == "true"
SA = DEFAULT_SERVICE_ACCOUNT
AUDIENCE = DEFAULT_AUDIENCE
PROJECT = "wif-broker-demo"
NUMBER = "123456789012"
ZONE = "us-central1-a"


def require_tool(name: str) -> str:
    """Path of a client tool; in CI a missing tool fails the test instead of skipping it."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI but is not on PATH")
        pytest.skip(f"{name} not installed")
    return path


class _DestroyedTasks(logging.Handler):
    """Counts asyncio's "Task was destroyed but it is pending!": a loop some test left with
    live tasks. Left alone, the garbage collector destroys them in a later, unrelated test,
    whose code is then interrupted by their finalizers (CI once failed an ``ast.parse``
    that way, tests/pyast.py), so the suite fails on it instead, naming the coroutine."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Task was destroyed but it is pending"):
            self.seen.append(message.splitlines()[-1][:300])


_DESTROYED = _DestroyedTasks()
logging.getLogger("asyncio").addHandler(_DESTROYED)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    gc.collect()
    if _DESTROYED.seen and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for task in _DESTROYED.seen if reporter is not None else ():
        reporter.ensure_newline()
        reporter.write_line(f"FAILED: a test left an asyncio task pending: {task}", red=True)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the host's credentials and proxies out of every test."""
    for key in list(os.environ):
        if key.startswith(("WIF_BROKER_", "GCE_METADATA", "AWS_", "AZURE_", "CLOUDSDK_")) or key in (
            "GOOGLE_APPLICATION_CREDENTIALS",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ):
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline checks (schema validation) must not reach for the network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogle]:
    async with FakeGoogle() as fake:
        yield fake


@pytest.fixture
def token_file(tmp_path: Path, google: FakeGoogle) -> Path:
    path = tmp_path / "token"
    path.write_text(google.subject_token() + "\n")
    return path


def credential_info(google: FakeGoogle, token_path: Path, *, impersonate: bool = True) -> dict[str, Any]:
    return google.credential_info(str(token_path), impersonate=impersonate)


@pytest.fixture
def cred_file(tmp_path: Path, google: FakeGoogle, token_file: Path) -> Path:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(credential_info(google, token_file)))
    return path


@pytest.fixture
def make_settings(cred_file: Path) -> Callable[..., settings.Settings]:
    """Settings for a broker on ephemeral loopback ports; keyword args are flags."""

    def build(**flags: Any) -> settings.Settings:
        merged: dict[str, Any] = {
            "credentials": str(cred_file),
            "listen": ["127.0.0.1:0"],
            "admin_listen": "127.0.0.1:0",
            "zone": ZONE,
        }
        merged.update(flags)
        return settings.build(merged, environ={})

    return build


@dataclass
class RunningBroker:
    host: str  # "127.0.0.1:PORT", what GCE_METADATA_HOST takes
    admin: str
    stop: asyncio.Event

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin}"

    def client_env(self, config_dir: Path | None = None) -> dict[str, str]:
        """Environment for a real client subprocess pointed at this broker."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GCE_METADATA", "CLOUDSDK_"))}
        env.update(
            GCE_METADATA_HOST=self.host,
            GCE_METADATA_IP=self.host,
            GCE_METADATA_ROOT=self.host,
            METADATA_EMULATOR_HOST=self.host,
            NO_PROXY="127.0.0.1,localhost",
        )
        env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        if config_dir is not None:
            env["CLOUDSDK_CONFIG"] = str(config_dir)
        return env


@contextlib.asynccontextmanager
async def run_broker(resolved: settings.Settings, **kwargs: Any) -> AsyncIterator[RunningBroker]:
    """Run the production daemon until the block exits, then drain it."""
    stop = asyncio.Event()
    ready: asyncio.Future[tuple[list[str], list[str]]] = asyncio.get_running_loop().create_future()

    async def on_listening(metadata: list[str], admin: list[str]) -> None:
        ready.set_result((metadata, admin))

    task = asyncio.create_task(daemon.serve(resolved, stop=stop, on_listening=on_listening, **kwargs))
    pending: set[asyncio.Future[Any]] = {task, ready}
    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # start-up failed: raise its error here
    metadata, admin = ready.result()
    try:
        yield RunningBroker(metadata[0], admin[0], stop)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


@pytest.fixture
async def broker(make_settings: Callable[..., settings.Settings]) -> AsyncIterator[RunningBroker]:
    """A broker with impersonation, zone set, against fresh fakes."""
    async with run_broker(make_settings()) as running:
        yield running


@pytest.fixture
def gcloud_config(tmp_path: Path) -> Path:
    # A fresh CLOUDSDK_CONFIG per test: gcloud caches "not on GCE" on disk.
    path = tmp_path / "gcloud"
    path.mkdir()
    return path

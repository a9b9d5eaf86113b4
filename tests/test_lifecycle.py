"""The daemon as a real process: health, readiness, admin isolation, SIGTERM drain (SPEC §3, §5).

Runs ``python -m broker demo`` (the real daemon against built-in fake upstreams)
on free loopback ports and talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

FLAVOR = {"Metadata-Flavor": "Google"}
PROJECT_ID = "/computeMetadata/v1/project/project-id"
TOKEN = "/computeMetadata/v1/instance/service-accounts/default/token"
START_DEADLINE = 20.0
EXIT_DEADLINE = 10.0  # SPEC §3: exit 0 within 10 s of SIGTERM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Daemon]:
    port, admin_port = free_port(), free_port()
    log = tmp_path / "broker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "demo",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin_port}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    try:
        yield Daemon(proc, port, admin_port, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as client:
        yield client


async def wait_ready(daemon: Daemon, session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            pytest.fail(f"broker exited {daemon.proc.returncode}:\n{daemon.output()}")
        try:
            async with session.get(f"{daemon.admin_url}/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail(f"broker not ready within {START_DEADLINE} s:\n{daemon.output()}")


async def test_health_readiness_and_admin_serves_no_token(
    demo: Daemon, session: aiohttp.ClientSession
) -> None:
    await wait_ready(demo, session)
    async with session.get(f"{demo.admin_url}/healthz") as resp:
        assert resp.status == 200
    async with session.get(f"{demo.admin_url}/readyz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "ready"
    # The admin port may be exposed beyond loopback: it must never hand out a token.
    for path in (
        TOKEN,
        TOKEN + "?scopes=a",
        "/computeMetadata/v1/instance/service-accounts/default/identity",
    ):
        async with session.get(demo.admin_url + path, headers=FLAVOR) as resp:
            assert resp.status == 404
            assert "access_token" not in await resp.text()
    # ... while the metadata port does.
    async with session.get(demo.url + TOKEN, headers=FLAVOR) as resp:
        assert resp.status == 200
        assert (await resp.json())["access_token"]


async def test_sigterm_drains_in_flight_request_and_exits_0(
    demo: Daemon, session: aiohttp.ClientSession
) -> None:
    await wait_ready(demo, session)
    async with session.get(demo.url + PROJECT_ID, headers=FLAVOR) as resp:
        assert resp.status == 200
        etag = resp.headers["ETag"]
        project = await resp.text()

    async def long_poll() -> tuple[int, str]:
        url = f"{demo.url}{PROJECT_ID}?wait_for_change=true&last_etag={etag}&timeout_sec=30"
        async with session.get(url, headers=FLAVOR) as resp:
            return resp.status, await resp.text()

    in_flight = asyncio.create_task(long_poll())
    await asyncio.sleep(0.5)  # the request is now parked in the server, waiting for a change
    assert not in_flight.done()

    started = time.monotonic()
    demo.proc.send_signal(signal.SIGTERM)
    status, body = await asyncio.wait_for(in_flight, timeout=EXIT_DEADLINE)
    assert (status, body) == (200, project)  # answered, not reset
    code = await asyncio.to_thread(demo.proc.wait, EXIT_DEADLINE)
    assert code == 0, demo.output()
    assert time.monotonic() - started < EXIT_DEADLINE

    for port in (demo.port, demo.admin_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

"""Signals (SPEC §8) on the daemon as a real process (``python -m broker run``).

SIGTERM: exit 0 within 10 s even while an upstream call hangs (the client waiting
on it gets a 503 naming the step after 5 s of drain). SIGHUP: the settings (TOML)
and credential files are read again; a good pair is swapped in (a new identity
shows in ``default/email`` and mints with the new account), a bad file leaves the
running configuration serving and is named in one log line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from broker.fakes import DEFAULT_SERVICE_ACCOUNT, FakeGoogle

MF = {"Metadata-Flavor": "Google"}
SA_PATH = "/computeMetadata/v1/instance/service-accounts/default/"
OTHER_SA = "other@wif-broker-demo.iam.gserviceaccount.com"
EXIT_DEADLINE = 10.0  # SPEC §3/§8
WAIT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Daemon:
    proc: asyncio.subprocess.Process
    port: int
    admin: int
    output: bytearray

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.decode(errors="replace")


async def _pump(stream: asyncio.StreamReader, into: bytearray) -> None:
    while chunk := await stream.read(65536):
        into.extend(chunk)


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogle]:
    async with FakeGoogle(service_accounts=(DEFAULT_SERVICE_ACCOUNT, OTHER_SA)) as fake:
        yield fake
        if fake.iam.gate is not None:
            fake.iam.gate.set()  # release any request a test left hanging


def write_credentials(path: Path, google: FakeGoogle, token_file: Path, account: str) -> None:
    info = google.credential_info(str(token_file))
    info["service_account_impersonation_url"] = google.impersonation_url(account)
    path.write_text(json.dumps(info))


@pytest.fixture
async def daemon(tmp_path: Path, google: FakeGoogle) -> AsyncIterator[Daemon]:
    token_file = tmp_path / "subject-token"
    token_file.write_text(google.subject_token(lifetime_seconds=7200))
    write_credentials(tmp_path / "credentials.json", google, token_file, DEFAULT_SERVICE_ACCOUNT)
    (tmp_path / "broker.toml").write_text('zone = "us-central1-a"\nproject-id = "wif-broker-demo"\n')
    port, admin = free_port(), free_port()
    argv = [
        sys.executable, "-m", "broker", "run",
        "--config", str(tmp_path / "broker.toml"),
        "--credentials", str(tmp_path / "credentials.json"),
        "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIF_BROKER_")}
    # asyncio's subprocess: the fakes serve from this event loop, which must not block.
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    assert proc.stdout is not None
    output = bytearray()
    pump = asyncio.create_task(_pump(proc.stdout, output))
    running = Daemon(proc, port, admin, output)
    try:
        await until_ready(running)
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(pump, 10)


async def until_ready(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT):
        while True:
            assert daemon.proc.returncode is None, daemon.text()
            try:
                async with session.get(f"http://127.0.0.1:{daemon.admin}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)


async def get(url: str, **params: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, headers=MF, params=params) as resp,
    ):
        return resp.status, await resp.text()


async def test_sigterm_exits_0_within_10_s_with_an_upstream_call_hanging(
    daemon: Daemon, google: FakeGoogle
) -> None:
    google.iam.gate = asyncio.Event()  # IAM accepts the request and never answers
    hanging = asyncio.create_task(
        get(daemon.url + SA_PATH + "token", scopes="https://www.googleapis.com/auth/devstorage.read_only")
    )

    async def iam_reached() -> None:
        while not any("generateAccessToken" in c.path for c in google.iam.calls[1:]):  # noqa: ASYNC110 - polls the fake
            await asyncio.sleep(0.02)

    await asyncio.wait_for(iam_reached(), WAIT)
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(daemon.proc.wait(), EXIT_DEADLINE + 5)
    took = time.monotonic() - started
    status, body = await asyncio.wait_for(hanging, 5)
    assert code == 0, daemon.text()
    assert took < EXIT_DEADLINE, f"exit took {took:.1f}s"
    assert status == 503, body
    assert body.startswith("iam_generate_access_token failed"), body


async def test_sighup_swaps_in_a_new_identity(daemon: Daemon, google: FakeGoogle, tmp_path: Path) -> None:
    status, email = await get(daemon.url + SA_PATH + "email")
    assert (status, email) == (200, DEFAULT_SERVICE_ACCOUNT)
    write_credentials(tmp_path / "credentials.json", google, tmp_path / "subject-token", OTHER_SA)
    (tmp_path / "broker.toml").write_text('zone = "us-central1-a"\nproject-id = "wif-broker-demo"\n')
    daemon.proc.send_signal(signal.SIGHUP)

    seen: list[object] = []

    async def swapped() -> None:
        while True:
            try:
                # A connection the old listener's accept queue held when it closed can be
                # left unanswered (a known gap of the swap); clients time out and retry.
                got = await asyncio.wait_for(get(daemon.url + SA_PATH + "email"), 3)
                seen.append(got)
                if got == (200, OTHER_SA):
                    return
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                seen.append(repr(exc))  # the instant between the old listener closing and the new one
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(swapped(), WAIT)
        await until_ready(daemon)
    except TimeoutError:
        raise AssertionError(f"{seen}\n{daemon.text()}") from None
    before = len(google.iam.calls)
    status, body = await get(daemon.url + SA_PATH + "token")
    assert status == 200, body
    assert json.loads(body)["access_token"] in google.iam.issued_access
    # The old identity's cached token is gone: this one was minted for the new account.
    minted = [c.path for c in google.iam.calls if "generateAccessToken" in c.path]
    assert OTHER_SA in minted[-1]
    assert len(google.iam.calls) >= before
    assert daemon.proc.returncode is None
    assert '"event": "reload", "outcome": "ok"' in daemon.text()


@pytest.mark.parametrize("broken", ["credentials.json", "broker.toml"])
async def test_sighup_with_a_broken_file_keeps_serving_and_names_it(
    broken: str, daemon: Daemon, tmp_path: Path
) -> None:
    (tmp_path / broken).write_text('{"type": "external_account", ' if broken.endswith("json") else "zone = [")
    daemon.proc.send_signal(signal.SIGHUP)

    async def logged() -> list[str]:
        while True:
            lines = [line for line in daemon.text().splitlines() if "reload failed" in line]
            if lines:
                return lines
            await asyncio.sleep(0.05)

    lines = await asyncio.wait_for(logged(), WAIT)
    await asyncio.sleep(0.5)  # nothing more is coming for this SIGHUP
    lines = [line for line in daemon.text().splitlines() if '"event": "reload"' in line]
    assert len(lines) == 1, lines
    entry = json.loads(lines[0])
    assert entry["file"] == str(tmp_path / broken)
    assert "Traceback" not in daemon.text()
    assert daemon.proc.returncode is None
    assert await get(daemon.url + SA_PATH + "email") == (200, DEFAULT_SERVICE_ACCOUNT)
    status, body = await get(daemon.url + SA_PATH + "token")
    assert status == 200, body


async def test_sigterm_during_a_reload_still_exits_0_within_10_s(
    daemon: Daemon, google: FakeGoogle, tmp_path: Path
) -> None:
    """SIGHUP to an identity whose mint hangs (the reload waits for it), then SIGTERM."""
    google.iam.gate = asyncio.Event()
    write_credentials(tmp_path / "credentials.json", google, tmp_path / "subject-token", OTHER_SA)
    calls = len(google.iam.calls)
    daemon.proc.send_signal(signal.SIGHUP)

    async def new_identity_minting() -> None:
        while len(google.iam.calls) == calls:  # noqa: ASYNC110 - polls the fake
            await asyncio.sleep(0.02)

    await asyncio.wait_for(new_identity_minting(), WAIT)
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(daemon.proc.wait(), EXIT_DEADLINE + 5)
    took = time.monotonic() - started
    assert code == 0, daemon.text()
    assert took < EXIT_DEADLINE, f"exit took {took:.1f}s"
    assert "Traceback" not in daemon.text()

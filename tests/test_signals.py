"""Signals (SPEC §8) on the daemon as a real process (``python -m broker run``).

SIGTERM: exit 0 within 10 s even while an upstream call hangs (the client waiting
on it gets a 503 naming the step after 5 s of drain). SIGHUP: the settings (TOML)
and credential files are read again; a good pair is swapped in (a new identity
shows in ``default/email`` and mints with the new account), a bad file leaves the
running configuration serving and is named in one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
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
PROJECT_PATH = "/computeMetadata/v1/project/project-id"
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


TOML = 'zone = "us-central1-a"\nproject-id = "wif-broker-demo"\n'


@pytest.fixture
async def daemon(tmp_path: Path, google: FakeGoogle) -> AsyncIterator[Daemon]:
    port, admin = free_port(), free_port()
    flags = ["--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"]
    async with launch(tmp_path, google, TOML, flags, port, admin) as running:
        yield running


def listen_toml(port: int, admin: int) -> str:
    """Addresses in the settings file, where a SIGHUP can change them."""
    return f'{TOML}listen = ["127.0.0.1:{port}"]\nadmin-listen = "127.0.0.1:{admin}"\n'


@contextlib.asynccontextmanager
async def launch(
    tmp_path: Path, google: FakeGoogle, toml: str, flags: list[str], port: int, admin: int
) -> AsyncIterator[Daemon]:
    token_file = tmp_path / "subject-token"
    token_file.write_text(google.subject_token(lifetime_seconds=7200))
    write_credentials(tmp_path / "credentials.json", google, token_file, DEFAULT_SERVICE_ACCOUNT)
    (tmp_path / "broker.toml").write_text(toml)
    argv = [
        sys.executable, "-m", "broker", "run",
        "--config", str(tmp_path / "broker.toml"),
        "--credentials", str(tmp_path / "credentials.json"),
        *flags,
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
        while True:  # no connection error is tolerated: the swap keeps the sockets
            got = await get(daemon.url + SA_PATH + "email")
            seen.append(got)
            if got == (200, OTHER_SA):
                return
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


async def test_a_reload_drops_no_connection(daemon: Daemon, google: FakeGoogle, tmp_path: Path) -> None:
    """SIGHUP while clients keep opening connections (what a node's agents do): every
    connection is answered, before, during and after the swap. A refused or reset
    connection is what makes gcloud write its "not on GCE" cache."""
    write_credentials(tmp_path / "credentials.json", google, tmp_path / "subject-token", OTHER_SA)
    done = asyncio.Event()
    failures: list[str] = []
    answered: list[int] = []

    async def client() -> None:
        while not done.is_set():  # bounded: done is set below, at most WAIT + 0.5 s from now
            try:
                status, _ = await asyncio.wait_for(get(daemon.url + PROJECT_PATH), 5)
                answered.append(status)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                failures.append(repr(exc))

    clients = [asyncio.create_task(client()) for _ in range(8)]
    try:
        await asyncio.sleep(0.2)
        daemon.proc.send_signal(signal.SIGHUP)
        await reload_logged(daemon, "ok")
        await asyncio.sleep(0.5)  # the old listeners drain meanwhile
    finally:
        done.set()
        await asyncio.gather(*clients)
    assert failures == [], f"{len(failures)} of {len(failures) + len(answered)} failed: {failures[:3]}"
    assert set(answered) == {200}
    assert await get(daemon.url + SA_PATH + "email") == (200, OTHER_SA)


async def reload_logged(daemon: Daemon, outcome: str) -> dict[str, object]:
    async with asyncio.timeout(WAIT):
        while True:
            for line in daemon.text().splitlines():
                if f'"outcome": "{outcome}"' in line:
                    entry: dict[str, object] = json.loads(line)
                    return entry
            await asyncio.sleep(0.05)


async def can_connect(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return False
    writer.close()
    return True


async def test_a_reload_to_other_addresses_moves_the_listeners(tmp_path: Path, google: FakeGoogle) -> None:
    port, admin, new_port, new_admin = (free_port() for _ in range(4))
    async with launch(tmp_path, google, listen_toml(port, admin), [], port, admin) as daemon:
        (tmp_path / "broker.toml").write_text(listen_toml(new_port, new_admin))
        daemon.proc.send_signal(signal.SIGHUP)
        await reload_logged(daemon, "ok")
        moved = Daemon(daemon.proc, new_port, new_admin, daemon.output)
        await until_ready(moved)
        assert await get(moved.url + SA_PATH + "email") == (200, DEFAULT_SERVICE_ACCOUNT)
        assert not await can_connect(port), "the old metadata address still listens"
        assert not await can_connect(admin), "the old admin address still listens"


async def test_a_reload_to_a_taken_address_goes_back_to_the_old_ones(
    tmp_path: Path, google: FakeGoogle
) -> None:
    port, admin = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        async with launch(tmp_path, google, listen_toml(port, admin), [], port, admin) as daemon:
            (tmp_path / "broker.toml").write_text(listen_toml(taken.getsockname()[1], admin))
            daemon.proc.send_signal(signal.SIGHUP)
            entry = await reload_logged(daemon, "error")
            assert "cannot listen on 127.0.0.1:" in str(entry["error"]), entry
            await until_ready(daemon)
            assert await get(daemon.url + SA_PATH + "email") == (200, DEFAULT_SERVICE_ACCOUNT)
            assert "Traceback" not in daemon.text()


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

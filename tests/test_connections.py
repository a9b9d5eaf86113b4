"""SPEC §8 "connections": head timeout, keep-alive, connection and long-poll caps, fd limit,
accept errors. Real daemon, real sockets; two cases run ``python -m broker`` as a process
with a lowered ``RLIMIT_NOFILE`` (set in the child only, before exec).

Timeouts are checked with their real length where the test stays short (the 10 s head
timeout); the 60 s keep-alive is shortened through :class:`listener.Limits`, the value the
daemon's runner takes, never a user setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from broker.clock import Clock, ManualClock
from broker.fakes import FakeGoogle
from broker.metadata import listener, watch
from tests.resilience._support import ready_broker, serve_chain, write_settings

V1 = "/computeMetadata/v1"
LEAF = f"{V1}/project/project-id"
AUDIENCE = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q"
FLAVOR = {"Metadata-Flavor": "Google"}
HEAD = f"GET {LEAF} HTTP/1.1\r\nHost: localhost\r\nMetadata-Flavor: Google\r\n\r\n".encode()


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response on a keep-alive connection: status and body (Content-Length framed)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await asyncio.wait_for(reader.readexactly(length), 30)


async def seconds_until_closed(reader: asyncio.StreamReader, limit: float) -> float:
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(4096), limit):
            pass
    return time.monotonic() - started


async def test_an_incomplete_head_is_closed_at_10_s_an_idle_keep_alive_is_not(tmp_path: Path) -> None:
    async with FakeGoogle() as google, ready_broker(write_settings(tmp_path, google)) as broker:

        async def slowloris() -> float:
            reader, writer = await connect(broker.host)
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            started = time.monotonic()

            async def dribble() -> None:
                with contextlib.suppress(ConnectionError):
                    for n in range(30):  # one header line a second, never the blank line
                        await asyncio.sleep(1)
                        writer.write(f"X-{n}: {'a' * 10}\r\n".encode())
                        await writer.drain()

            dribbling = asyncio.create_task(dribble())
            await seconds_until_closed(reader, 30)
            dribbling.cancel()
            writer.close()
            return time.monotonic() - started

        async def silent() -> float:
            reader, writer = await connect(broker.host)
            elapsed = await seconds_until_closed(reader, 30)
            writer.close()
            return elapsed

        async def idle_keep_alive() -> int:
            reader, writer = await connect(broker.host)
            writer.write(HEAD)
            assert (await read_response(reader))[0] == 200
            await asyncio.sleep(11)  # idle past the head timeout: keep-alive governs now
            writer.write(HEAD)
            status, _ = await read_response(reader)
            writer.close()
            return status

        dribbled, quiet, second = await asyncio.gather(slowloris(), silent(), idle_keep_alive())
    assert 9.5 <= dribbled <= 13, dribbled
    assert 9.5 <= quiet <= 13, quiet
    assert second == 200


@contextlib.asynccontextmanager
async def guarded(
    tmp_path: Path, google: FakeGoogle, limits: listener.Limits, clock: Clock | None = None, **flags: object
) -> AsyncIterator[str]:
    """The daemon's metadata app behind the daemon's runner class, with ``limits``
    (and the broker's ``clock`` and settings ``flags``); yields ``host:port``."""
    resolved = write_settings(tmp_path, google, **flags)
    async with aiohttp.ClientSession() as session, serve_chain(resolved, session, clock, limits) as url:
        yield url.removeprefix("http://")


async def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    assert listener.Limits().keepalive_timeout == 60  # what the daemon runs with
    async with (
        FakeGoogle() as google,
        guarded(tmp_path, google, listener.Limits(keepalive_timeout=1)) as address,
    ):
        reader, writer = await connect(address)
        writer.write(HEAD)
        assert (await read_response(reader))[0] == 200
        elapsed = await seconds_until_closed(reader, 30)
        writer.close()
    assert 0.5 <= elapsed <= 5, elapsed


async def test_at_the_cap_a_new_client_displaces_the_oldest_idle_connection(tmp_path: Path) -> None:
    """1,024 connections held open with no request (what a local process flooding half-open
    sockets does): the next client is served, and the oldest idle connection is closed."""
    async with FakeGoogle() as google, ready_broker(write_settings(tmp_path, google)) as broker:
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(listener.MAX_CONNECTIONS):
                held.append(await connect(broker.host))
            # The last one answered: the server has accepted every earlier one by now.
            reader, writer = held[-1]
            writer.write(HEAD)
            assert (await read_response(reader))[0] == 200
            for _ in range(3):  # each newcomer displaces the next-oldest idle one
                reader, writer = await connect(broker.host)
                writer.write(HEAD)
                assert (await read_response(reader))[0] == 200
                writer.close()
            for oldest_reader, _ in held[:3]:
                assert await asyncio.wait_for(oldest_reader.read(), 30) == b"", "not displaced"
        finally:
            for _, writer in held:
                writer.close()


async def test_when_every_connection_is_busy_a_new_one_gets_503(tmp_path: Path) -> None:
    """At the cap with every connection serving a request (here long-polls), a new client
    gets a bare 503 with the GCE headers and is closed; a freed slot serves again."""
    limits = listener.Limits(max_connections=4)
    async with FakeGoogle() as google, guarded(tmp_path, google, limits) as address:
        reader, writer = await connect(address)
        writer.write(HEAD)
        status, _ = await read_response(reader)
        assert status == 200
        writer.close()
        etag_reader, etag_writer = await connect(address)
        etag_writer.write(HEAD)
        head = (await asyncio.wait_for(etag_reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1")
        etag_writer.close()
        etag = next(
            line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("etag:")
        )
        poll = (
            f"GET {LEAF}?wait_for_change=true&last_etag={etag}&timeout_sec=30 HTTP/1.1\r\n"
            "Host: localhost\r\nMetadata-Flavor: Google\r\n\r\n"
        ).encode()
        polls = []
        try:
            for _ in range(limits.max_connections):
                polls.append(await connect(address))
                polls[-1][1].write(poll)
            await asyncio.sleep(0.5)  # every poll is in its handler now
            reader, writer = await connect(address)
            refused = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert refused.startswith(b"HTTP/1.1 503 "), refused[:100]
            assert b"Metadata-Flavor: Google" in refused
            polls.pop(0)[1].close()  # a client hangs up: its slot is freed
            await asyncio.sleep(0.5)
            reader, writer = await connect(address)
            writer.write(HEAD)
            assert (await read_response(reader))[0] == 200
            writer.close()
        finally:
            for _, poll_writer in polls:
                poll_writer.close()


async def test_a_paused_refusal_does_not_hold_a_slot_at_the_cap(tmp_path: Path) -> None:
    """Connections whose 429 is being paused (listener.pace_refusal) count as idle at the
    cap: a flood that parks a refused request on every connection cannot lock a new client
    out; the newcomer displaces the oldest parked one, which is closed unanswered."""
    limits = listener.Limits(max_connections=4, refusal_pause=(30.0, 30.0))
    clock = ManualClock()  # the bucket (burst 2) never refills: exactly two 200s, then 429s
    async with (
        FakeGoogle(now=clock.wall) as google,
        guarded(tmp_path, google, limits, clock, upstream_rate=1) as address,
    ):
        parked = []
        try:
            for i in range(2 + limits.max_connections):  # the burst (2), then refusals
                reader, writer = await connect(address)
                writer.write(
                    f"GET {V1}/instance/service-accounts/default/identity?audience=https://a{i}.example "
                    "HTTP/1.1\r\nHost: localhost\r\nMetadata-Flavor: Google\r\n\r\n".encode()
                )
                if i < 2:
                    assert (await read_response(reader))[0] == 200
                    writer.close()
                else:
                    parked.append((reader, writer))
            await asyncio.sleep(0.5)  # every refusal is in its pause now
            reader, writer = await connect(address)
            writer.write(HEAD)
            assert (await read_response(reader))[0] == 200  # not the bare 503 of a full house
            writer.close()
            assert await asyncio.wait_for(parked[0][0].read(), 30) == b"", "oldest parked not displaced"
        finally:
            for _, parked_writer in parked:
                parked_writer.close()


async def test_the_257th_long_poll_gets_503(tmp_path: Path) -> None:
    async with FakeGoogle() as google, ready_broker(write_settings(tmp_path, google)) as broker:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=90)
        ) as session:
            url = broker.url + LEAF
            headers = {"Metadata-Flavor": "Google"}
            async with session.get(url, headers=headers) as resp:
                etag = resp.headers["ETag"]

            async def poll(seconds: int) -> tuple[int, dict[str, str]]:
                params = {"wait_for_change": "true", "last_etag": etag, "timeout_sec": str(seconds)}
                async with session.get(url, headers=headers, params=params) as resp:
                    await resp.read()
                    return resp.status, dict(resp.headers)

            # 257 contenders at once: exactly one is refused, whichever comes last.
            waiting = [asyncio.create_task(poll(60)) for _ in range(watch.MAX_WAITERS + 1)]
            try:
                done, _ = await asyncio.wait(waiting, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                assert len(done) == 1, "no long-poll was refused"
                status, answer_headers = done.pop().result()
                assert status == 503
                assert answer_headers["Metadata-Flavor"] == "Google"
                assert answer_headers["Retry-After"] == "1"
                await asyncio.sleep(0.5)
                assert len([task for task in waiting if task.done()]) == 1, "a second long-poll ended early"
                # Other requests are still served while the long-polls hold their slots.
                async with session.get(url, headers=headers) as resp:
                    assert resp.status == 200
            finally:
                broker.stop.set()  # the drain releases the waiters
                results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 30)
        statuses = sorted(r[0] if not isinstance(r, BaseException) else repr(r) for r in results)
        assert statuses == [200] * watch.MAX_WAITERS + [503], statuses[-3:]


async def test_a_dropped_long_poll_frees_its_slot(tmp_path: Path) -> None:
    async with FakeGoogle() as google, ready_broker(write_settings(tmp_path, google)) as broker:
        async with aiohttp.ClientSession() as session, session.get(broker.url + LEAF, headers=FLAVOR) as resp:
            etag = resp.headers["ETag"]

        def long_poll(seconds: int) -> bytes:
            query = f"wait_for_change=true&last_etag={etag}&timeout_sec={seconds}"
            return (
                f"GET {LEAF}?{query} HTTP/1.1\r\nHost: localhost\r\nMetadata-Flavor: Google\r\n\r\n".encode()
            )

        polls = [await connect(broker.host) for _ in range(watch.MAX_WAITERS + 1)]
        try:
            for _, writer in polls:
                writer.write(long_poll(60))
            reads = {asyncio.create_task(reader.read(100)): n for n, (reader, _) in enumerate(polls)}
            done, _ = await asyncio.wait(reads, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1, "no long-poll was refused"
            refused = reads[done.pop()]
            waiting = [n for n in range(len(polls)) if n != refused]
            for n in waiting[:10]:  # ten clients hang up
                polls[n][1].close()
            await asyncio.sleep(1)
            reader, writer = await connect(broker.host)
            writer.write(long_poll(1))
            status, _ = await read_response(reader)
            writer.close()
            assert status == 200, "the dropped long-polls still hold their slots"
            for task in reads:
                task.cancel()
        finally:
            for _, writer in polls:
                writer.close()


# --- as a process, with RLIMIT_NOFILE lowered ---------------------------------------------


def credentials(tmp_path: Path) -> Path:
    token = tmp_path / "subject-token"
    token.write_text("eyJhbGciOiJub25lIn0.e30.")
    path = tmp_path / "credentials.json"
    sa = "app@wif-broker-demo.iam.gserviceaccount.com"
    path.write_text(
        json.dumps(
            {
                "type": "external_account",
                "audience": AUDIENCE,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "http://127.0.0.1:9/v1/token",  # refused at once: no upstream needed here
                "credential_source": {"file": str(token)},
                "service_account_impersonation_url": (
                    f"http://127.0.0.1:9/v1/projects/-/serviceAccounts/{sa}:generateAccessToken"
                ),
            }
        )
    )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def broker_process(
    tmp_path: Path, soft: int, hard: int
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    port, admin = free_port(), free_port()

    def limit() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    env = {k: v for k, v in os.environ.items() if not k.startswith("WIF_BROKER_")}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "broker", "run", "--credentials", str(credentials(tmp_path))),
        *("--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}", "--log-format", "json"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        preexec_fn=limit,
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the broker never listened")
        yield proc, port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_the_soft_fd_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.fail(f"this test needs a finite hard RLIMIT_NOFILE above 256, not {hard}")
    async with broker_process(tmp_path, soft=256, hard=hard) as (proc, _):
        limits = await asyncio.to_thread(Path(f"/proc/{proc.pid}/limits").read_text)
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    soft_seen, hard_seen = line.split()[3:5]
    assert (int(soft_seen), int(hard_seen)) == (hard, hard), line


async def test_accept_errors_are_logged_at_most_once_a_second(tmp_path: Path) -> None:
    # 64 descriptors in all (hard too, so raising the soft limit cannot help):
    # 150 client connections exhaust them and every accept fails with EMFILE.
    async with broker_process(tmp_path, soft=64, hard=64) as (proc, port):
        held = []
        for _ in range(150):
            held.append(await asyncio.open_connection("127.0.0.1", port))  # the kernel completes them
        started = time.monotonic()
        await asyncio.sleep(4)
        elapsed = time.monotonic() - started
        for _, writer in held:
            writer.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        stderr = (await asyncio.wait_for(proc.stderr.read(), 30)).decode(errors="replace")
    assert "Traceback" not in stderr, stderr[-3000:]
    # The listener's own lines: others may quote this test's tmp path, which says "accept".
    lines = [line for line in stderr.splitlines() if '"broker.listener"' in line and "accept" in line]
    assert lines, f"no accept error was logged:\n{stderr[-3000:]}"
    assert len(lines) <= elapsed + 3, lines
    assert len(stderr) < 100_000, len(stderr)

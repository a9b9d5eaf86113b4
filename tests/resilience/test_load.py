"""Bounded load at the metadata listener: idle connections and oversized requests.

Raw sockets, so the requests are exactly what is on the wire. Assertions are on
outcomes (a 200 still comes; a 4xx or a closed connection, never a 5xx), not
on how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from tests.conftest import RunningBroker
from tests.resilience._support import TOKEN_PATH, WAIT, get, token

IDLE = 1000


def address(broker: RunningBroker) -> tuple[str, int]:
    host, port = broker.host.rsplit(":", 1)
    return host, int(port)


async def test_a_thousand_idle_connections_do_not_starve_a_new_one(broker: RunningBroker) -> None:
    """1,000 connections held open: half never send a byte, half stop in the middle of
    their headers (slowloris). A new client still gets its token, the admin listener still
    answers, and once they go away the broker serves as before."""
    host, port = address(broker)
    readers: list[asyncio.StreamReader] = []
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(IDLE // 100):
            opened = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(100)))
            for i, (reader, writer) in enumerate(opened):
                if i % 2:
                    writer.write(f"GET {TOKEN_PATH} HTTP/1.1\r\nHost: x\r\nMetadata-F".encode())
                readers.append(reader)
                writers.append(writer)
        # The accept queue is FIFO: this request is accepted after all 1,000 idle ones.
        answer = await token(broker.url)
        assert answer.status == 200, answer.text
        assert (await get(broker.admin_url + "/healthz", headers={})).status == 200
        assert not any(r.at_eof() for r in readers), "the broker dropped idle connections"
    finally:
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert (await token(broker.url)).status == 200


async def exchange(broker: RunningBroker, request: bytes) -> int | None:
    """Send ``request`` raw; the response status, or None when the broker closed on us."""
    host, port = address(broker)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def get_request(target: str = TOKEN_PATH, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata-Flavor: Google\r\n{extra}\r\n".encode()


OVERSIZED = {
    "64 KiB header value": get_request(extra=f"X-Big: {'a' * 65536}\r\n"),
    "1 MiB header value": get_request(extra=f"X-Big: {'a' * (1 << 20)}\r\n"),
    "10,000 headers": get_request(extra="".join(f"X-H{i}: v\r\n" for i in range(10_000))),
    "100 KiB path": get_request("/computeMetadata/v1/" + "a" * 100_000),
    "100 KiB query": get_request(f"{TOKEN_PATH}?scopes={'a' * 100_000}"),
    "1 MiB query": get_request(f"{TOKEN_PATH}?audience={'a' * (1 << 20)}"),
}


@pytest.mark.parametrize("name", list(OVERSIZED))
async def test_oversized_request_heads_are_refused_with_4xx(
    broker: RunningBroker, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused with a 4xx (or the connection closed), and logged as one WARNING line that
    names the parser's error: no ERROR, no traceback, none of the request's bytes."""
    caplog.set_level(logging.DEBUG)
    status = await exchange(broker, OVERSIZED[name])
    assert status is None or 400 <= status < 500, status
    assert (await token(broker.url)).status == 200
    server = [r for r in caplog.records if r.name.startswith("aiohttp")]
    loud = [r.getMessage() for r in server if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, loud
    if status is not None:
        refused = [r.getMessage() for r in server if r.levelno == logging.WARNING]
        assert len(refused) == 1, refused
        assert refused[0].startswith("refused a malformed HTTP request: "), refused
        assert f"(HTTP {status})" in refused[0]
        assert "aaaa" not in refused[0]


BODIES = {
    "GET, 1 MiB body": (get_request(extra=f"Content-Length: {1 << 20}\r\n") + b"x" * (1 << 20), 200),
    "GET, 64 MiB declared, 1 KiB sent": (
        get_request(extra=f"Content-Length: {64 << 20}\r\n") + b"x" * 1024,
        200,
    ),
    "GET, chunked 256 KiB": (
        get_request(extra="Transfer-Encoding: chunked\r\n")
        + b"40000\r\n"
        + b"x" * (1 << 18)
        + b"\r\n0\r\n\r\n",
        200,
    ),
    "POST, 1 MiB body": (
        get_request(extra=f"Content-Length: {1 << 20}\r\n").replace(b"GET ", b"POST ", 1) + b"x" * (1 << 20),
        405,
    ),
}


@pytest.mark.parametrize("name", list(BODIES))
async def test_bodies_are_ignored_or_refused(broker: RunningBroker, name: str) -> None:
    """A GET's body is never read (the token is served regardless); other methods get 405
    before any body is read."""
    request, expected = BODIES[name]
    assert await exchange(broker, request) == expected
    assert (await token(broker.url)).status == 200

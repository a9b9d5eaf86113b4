"""SPEC §8 "local attack surface": the wire guard, over raw sockets against the real daemon.

Raw bytes rather than aiohttp's client: the tests need to send exactly the
``Host`` (or none), repeated headers and HTTP/1.0 that a client library would
normalise. Every refusal must still carry the GCE headers (SPEC §3) and no token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from broker import settings
from tests.conftest import RunningBroker, run_broker

V1 = "/computeMetadata/v1"
TOKEN = f"{V1}/instance/service-accounts/default/token"


async def raw(address: str, head: str) -> tuple[int, dict[str, list[str]], bytes]:
    """Send ``head`` as written (CRLF added) on a fresh connection; read the whole answer."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.setdefault(key.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


def get(path: str, *extra: str, host: str | None = "localhost", version: str = "1.1") -> str:
    lines = [f"GET {path} HTTP/{version}", "Connection: close"]
    if host is not None:
        lines.append(f"Host: {host}")
    return "\n".join([*lines, *extra, ""])


def assert_gce_refusal(status: int, headers: dict[str, list[str]], body: bytes, expected: int) -> None:
    assert status == expected, body
    assert headers["metadata-flavor"] == ["Google"]
    assert headers["server"] == ["Metadata Server for VM"]
    assert b"access_token" not in body


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LocalHost:8988",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]",
        "[::1]:8988",
        "metadata.google.internal",
        "METADATA.GOOGLE.INTERNAL:80",
        "metadata.google.internal.",  # the FQDN spelling of the same name
        "metadata",
        "169.254.169.254",
        "169.254.169.254:80",
    ],
)
async def test_allowed_hosts_get_a_token(broker: RunningBroker, host: str) -> None:
    status, headers, body = await raw(broker.host, get(TOKEN, "Metadata-Flavor: Google", host=host))
    assert status == 200, body
    assert b"access_token" in body
    assert headers["metadata-flavor"] == ["Google"]


async def test_the_listen_address_itself_is_allowed(broker: RunningBroker) -> None:
    status, _, body = await raw(broker.host, get(TOKEN, "Metadata-Flavor: Google", host=broker.host))
    assert status == 200, body


@pytest.mark.parametrize(
    "host",
    [
        "rebind.attacker.example",
        "rebind.attacker.example:8988",
        "127.0.0.1.nip.io",
        "localhost.attacker.example",
        "metadata.google.internal.attacker.example",
        "metadata..",
        "[::2]",
        "[::1]x",
        "localhost:http",
        "127.0.0.2",
        "",
    ],
)
async def test_dns_rebinding_is_refused(broker: RunningBroker, host: str) -> None:
    for path in (TOKEN, "/", "/latest/meta-data/"):
        reply = await raw(broker.host, get(path, "Metadata-Flavor: Google", host=host))
        assert_gce_refusal(*reply, expected=403)
        assert host.encode() not in reply[2] or not host, "the refusal must not echo the Host"


async def test_a_request_without_host(broker: RunningBroker) -> None:
    # HTTP/1.0 without Host: no browser sends that, so it cannot be a rebinding page.
    status, _, body = await raw(broker.host, get(TOKEN, "Metadata-Flavor: Google", host=None, version="1.0"))
    assert status == 200, body
    # HTTP/1.1 requires exactly one Host (RFC 9112 §3.2); aiohttp's parser refuses
    # the request before any handler, and the listener still sends the GCE headers.
    reply = await raw(broker.host, get(TOKEN, "Metadata-Flavor: Google", host=None))
    assert_gce_refusal(*reply, expected=400)
    reply = await raw(broker.host, get(TOKEN, "Metadata-Flavor: Google", "Host: localhost"))
    assert_gce_refusal(*reply, expected=400)


async def test_a_malformed_head_gets_the_gce_headers_and_no_echo(broker: RunningBroker) -> None:
    reply = await raw(broker.host, "GET /\x01<script> HTTP/1.1\nHost: localhost\n")
    assert_gce_refusal(*reply, expected=400)
    assert b"script" not in reply[2]


@pytest.mark.parametrize(
    "header",
    [
        "Origin: http://rebind.attacker.example",
        "Origin: null",
        "Sec-Fetch-Site: cross-site",
        "Sec-Fetch-Mode: no-cors",
        "Forwarded: for=10.0.0.1",
        "Via: 1.1 squid",
        "X-Forwarded-For: 10.0.0.1",
        "X-Forwarded-Host: metadata.google.internal",
        "X-Real-IP: 10.0.0.1",
        "x-real-ip: 10.0.0.1",
    ],
)
async def test_browser_and_proxy_headers_are_refused(broker: RunningBroker, header: str) -> None:
    for path in (TOKEN, "/", f"{V1}/project/project-id", "/latest/meta-data/"):
        reply = await raw(broker.host, get(path, "Metadata-Flavor: Google", header))
        assert_gce_refusal(*reply, expected=403)


async def test_a_repeated_metadata_flavor_is_refused(broker: RunningBroker) -> None:
    for second in ("Google", "x"):
        reply = await raw(broker.host, get(TOKEN, "Metadata-Flavor: Google", f"Metadata-Flavor: {second}"))
        assert_gce_refusal(*reply, expected=403)


async def test_a_redirect_never_echoes_host(broker: RunningBroker) -> None:
    status, headers, _ = await raw(
        broker.host, get(f"{V1}/instance/service-accounts?recursive=true", "Metadata-Flavor: Google")
    )
    assert status == 301
    assert headers["location"] == [f"{V1}/instance/service-accounts/?recursive=true"]
    assert headers["metadata-flavor"] == ["Google"]


async def test_a_wildcard_listener_accepts_the_address_connected_to(
    make_settings: Callable[..., settings.Settings],
) -> None:
    # 0.0.0.0 is reachable on every local address; a client may name the one it used
    # (an IP literal cannot be rebound), but not another one.
    async with run_broker(make_settings(listen=["0.0.0.0:0"])) as running:
        port = running.host.rsplit(":", 1)[1]
        status, _, body = await raw(
            f"127.0.0.2:{port}", get(TOKEN, "Metadata-Flavor: Google", host="127.0.0.2")
        )
        assert status == 200, body
        reply = await raw(f"127.0.0.2:{port}", get(TOKEN, "Metadata-Flavor: Google", host="127.0.0.3"))
        assert_gce_refusal(*reply, expected=403)

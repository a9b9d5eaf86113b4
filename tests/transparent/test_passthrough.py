"""IMDS pass-through (transparent mode, SPEC §3 last bullet, §6) on loopback.

The production daemon relays requests outside ``/computeMetadata/`` to the
``imds-passthrough`` upstream: a recording echo server here, or the AWS
FakeImds driven by real botocore. Everything stays on 127.0.0.1; the
169.254.169.254 scenarios are in ``test_transparent.py`` (network namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from broker import metrics, settings
from broker.errors import ConfigError
from broker.metadata import passthrough
from tests.conftest import RunningBroker, run_broker
from tests.fakes.aws import ISOLATED_ENV, FakeAwsAccount, FakeImds

MF = {"Metadata-Flavor": "Google"}
SERVER = "Metadata Server for VM"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
AWS_TOKEN = "AQAEAsecret-imds-session-token=="


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Echo:
    """A recording upstream: answers ``reply`` (status, headers, body), or holds requests while ``hold``."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    reply: tuple[int, dict[str, str], bytes] = (200, {"Content-Type": "text/plain"}, b"upstream says hi")
    hold: asyncio.Event | None = None

    def headers(self, index: int = -1) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name, value in self.seen[index].headers:
            found.setdefault(name.lower(), []).append(value)
        return found

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items()), body))
        if self.hold is not None:
            await self.hold.wait()
        status, headers, body = self.reply
        return web.Response(status=status, headers=headers, body=body)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    upstream = Echo()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    async with serving(app) as url:
        upstream.url = url
        yield upstream


@pytest.fixture
async def relay(echo: Echo, make_settings: Callable[..., settings.Settings]) -> AsyncIterator[RunningBroker]:
    async with run_broker(make_settings(imds_passthrough=echo.url + "/")) as running:
        yield running


async def raw(host: str, request: str) -> tuple[int, dict[str, list[str]], bytes]:
    """Send bytes exactly as written (aiohttp's client would rewrite hop-by-hop headers)."""
    name, port = host.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(name, int(port))
    try:
        writer.write(request.encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.setdefault(key.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


async def call(url: str | URL, method: str = "GET", **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def passthrough_requests(status: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "wif_broker_requests_total", {"endpoint": "passthrough", "status": status}
    )
    return value or 0.0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- off: refused -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/latest/meta-data/"), ("PUT", "/latest/api/token"), ("GET", "/metadata/instance")],
)
async def test_off_non_gce_paths_are_404_whatever_the_method(
    broker: RunningBroker, method: str, path: str
) -> None:
    status, headers, _ = await call(broker.url + path, method, headers={"Metadata": "true"})
    assert status == 404
    assert headers["Metadata-Flavor"] == "Google"
    assert headers["Server"] == SERVER


# --- on: relayed verbatim ---------------------------------------------------------------------


async def test_get_is_relayed_with_path_query_and_end_to_end_headers(
    relay: RunningBroker, echo: Echo
) -> None:
    echo.reply = (
        200,
        {"Content-Type": "text/plain", "X-Upstream": "1", "Connection": "keep-alive, X-Hop", "X-Hop": "h"},
        b"my-role",
    )
    before = passthrough_requests("2xx")
    path = "/latest/meta-data/iam/security-credentials/?a=b%20c&x=%2F&empty="
    status, headers, body = await raw(
        relay.host,
        f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n"
        f"X-aws-ec2-metadata-token: {AWS_TOKEN}\r\n"
        "User-Agent: Boto3/1.0 md/imds\r\n"
        "Accept: */*\r\n"
        "X-Repeated: one\r\nX-Repeated: two\r\n"
        "Connection: close, X-Private\r\nX-Private: dropped\r\n"
        "Proxy-Authorization: Basic dropped\r\nTE: trailers\r\nKeep-Alive: timeout=5\r\n\r\n",
    )
    assert (status, body) == (200, b"my-role")
    assert headers["x-upstream"] == ["1"]
    assert "x-hop" not in headers, "a header the upstream's Connection names is hop-by-hop"
    assert "metadata-flavor" not in headers, "a relayed answer is the host cloud's, not a GCE one"

    (seen,) = echo.seen
    assert (seen.method, seen.raw_path, seen.body) == ("GET", path, b"")
    sent = echo.headers()
    assert sent["x-aws-ec2-metadata-token"] == [AWS_TOKEN]
    assert sent["user-agent"] == ["Boto3/1.0 md/imds"]
    assert sent["accept"] == ["*/*"]
    assert sent["x-repeated"] == ["one", "two"]
    assert sent["via"] == [passthrough.VIA]
    assert sent["host"] == [echo.url.removeprefix("http://")]
    for hop in ("x-private", "proxy-authorization", "te", "keep-alive", "x-forwarded-for", "metadata-flavor"):
        assert hop not in sent, hop
    assert "close" not in sent.get("connection", [""])[0]
    assert passthrough_requests("2xx") == before + 1


async def test_the_relay_is_no_open_proxy(relay: RunningBroker, echo: Echo) -> None:
    target = "http://attacker.example:8080/latest/x%2Fy?q=%3A"
    status, _, _ = await raw(
        relay.host, f"GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert echo.seen[-1].raw_path == "/latest/x%2Fy?q=%3A", "only the path and query travel"
    assert echo.headers()["host"] == [echo.url.removeprefix("http://")]


async def test_a_foreign_host_is_not_relayed(relay: RunningBroker, echo: Echo) -> None:
    # SPEC §8: DNS rebinding reaches the pass-through too (a page on a name that
    # resolves to 169.254.169.254 would read IMDSv1 through the relay).
    status, headers, _ = await raw(
        relay.host, "GET /latest/meta-data/ HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n"
    )
    assert status == 403
    assert headers["metadata-flavor"] == ["Google"]
    assert echo.seen == []


async def test_trace_is_not_relayed(relay: RunningBroker, echo: Echo) -> None:
    status, headers, _ = await call(relay.url + "/latest/meta-data/", "TRACE")
    assert status == 405
    assert headers["Metadata-Flavor"] == "Google"
    assert echo.seen == []


async def test_nothing_is_added_that_the_client_did_not_send(relay: RunningBroker, echo: Echo) -> None:
    await raw(
        relay.host, "GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
    )
    sent = echo.headers()
    assert set(sent) <= {"host", "via", "connection", "content-length"}, sent


async def test_imdsv2_token_put_is_relayed_with_its_headers_and_body(
    relay: RunningBroker, echo: Echo
) -> None:
    echo.reply = (200, {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, AWS_TOKEN.encode())
    status, headers, body = await call(
        relay.url + "/latest/api/token",
        "PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
        data=b"body-bytes",
    )
    assert (status, body) == (200, AWS_TOKEN.encode())
    assert headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    (seen,) = echo.seen
    assert (seen.method, seen.raw_path, seen.body) == ("PUT", "/latest/api/token", b"body-bytes")
    assert echo.headers()["x-aws-ec2-metadata-token-ttl-seconds"] == ["21600"]
    assert echo.headers()["content-length"] == ["10"]


async def test_azure_imds_request_and_error_are_relayed_without_flavor_checks(
    relay: RunningBroker, echo: Echo
) -> None:
    resource = "https%3A%2F%2Fmanagement.azure.com%2F"
    path = f"/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}"
    echo.reply = (400, {"Content-Type": "application/json"}, b'{"error":"invalid_request"}')
    url = URL(relay.url + path, encoded=True)  # as sent: yarl would otherwise unquote %3A and %2F
    status, headers, body = await call(url, headers={"Metadata": "true"})
    assert (status, body) == (400, b'{"error":"invalid_request"}')
    assert headers["Content-Type"] == "application/json"
    assert echo.seen[-1].raw_path == path
    assert echo.headers()["metadata"] == ["true"]


async def test_gce_paths_are_never_relayed(relay: RunningBroker, echo: Echo) -> None:
    status, headers, _ = await call(relay.url + "/computeMetadata/v2/instance/", headers=MF)
    assert status == 404
    assert headers["Metadata-Flavor"] == "Google"
    status, _, _ = await call(relay.url + "/computeMetadata/v1/project/project-id")
    assert status == 403, "the flavor rule still holds under /computeMetadata/"
    status, _, _ = await call(relay.url + "/", "PUT")
    assert status == 405
    status, _, body = await call(relay.url + TOKEN_PATH, headers=MF)
    assert status == 200, body
    assert echo.seen == []


async def test_x_forwarded_for_is_refused_and_not_relayed(relay: RunningBroker, echo: Echo) -> None:
    for method, path in (("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/")):
        status, headers, _ = await call(relay.url + path, method, headers={"X-Forwarded-For": "10.1.2.3"})
        assert status == 403
        assert headers["Metadata-Flavor"] == "Google"
    assert echo.seen == []


# --- on: failures ---------------------------------------------------------------------------


async def test_upstream_down_is_502(make_settings: Callable[..., settings.Settings]) -> None:
    resolved = make_settings(imds_passthrough=f"http://127.0.0.1:{closed_port()}")
    async with run_broker(resolved) as running:
        status, headers, body = await call(running.url + "/latest/meta-data/", headers={"X-Token": AWS_TOKEN})
    assert status == 502
    assert headers["Metadata-Flavor"] == "Google"
    assert headers["Server"] == SERVER
    assert b"IMDS pass-through to 127.0.0.1" in body
    assert AWS_TOKEN.encode() not in body


async def test_upstream_silent_is_504(
    echo: Echo, make_settings: Callable[..., settings.Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(passthrough, "TIMEOUT", aiohttp.ClientTimeout(total=0.5))
    echo.hold = asyncio.Event()  # never set: the upstream accepts and never answers
    async with run_broker(make_settings(imds_passthrough=echo.url)) as running:
        status, headers, _ = await call(running.url + "/latest/meta-data/")
    echo.hold.set()  # let the upstream's held handler finish, so its server stops at once
    assert status == 504
    assert headers["Metadata-Flavor"] == "Google"


async def test_bodies_are_bounded(relay: RunningBroker, echo: Echo) -> None:
    too_big = b"x" * (passthrough.MAX_REQUEST_BODY + 1)
    status, _, _ = await call(relay.url + "/latest/api/token", "PUT", data=too_big)
    assert status == 413
    assert echo.seen == []
    echo.reply = (200, {}, b"y" * (passthrough.MAX_RESPONSE_BODY + 1))
    status, headers, _ = await call(relay.url + "/latest/user-data")
    assert status == 502
    assert headers["Metadata-Flavor"] == "Google"


async def test_a_loop_back_to_the_broker_is_cut_at_once(
    make_settings: Callable[..., settings.Settings],
) -> None:
    # The UID exemption missing: the broker's own relay would reach itself again.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    resolved = make_settings(
        listen=["127.0.0.1:0", f"127.0.0.1:{port}"], imds_passthrough=f"http://localhost:{port}"
    )
    async with run_broker(resolved) as running:
        status, _, body = await call(running.url + "/latest/meta-data/")
    assert status == 508
    assert b"exempt the broker's UID" in body


async def test_failure_logs_name_the_upstream_but_no_token(
    make_settings: Callable[..., settings.Settings], caplog: pytest.LogCaptureFixture
) -> None:
    resolved = make_settings(imds_passthrough=f"http://127.0.0.1:{closed_port()}")
    with caplog.at_level(logging.DEBUG, logger="broker"):
        async with run_broker(resolved) as running:
            await call(
                running.url + "/latest/meta-data/iam/security-credentials/role?q=" + AWS_TOKEN,
                headers={"X-aws-ec2-metadata-token": AWS_TOKEN},
            )
    failures = [r for r in caplog.records if getattr(r, "event", "") == "passthrough_error"]
    assert len(failures) == 1
    for record in caplog.records:
        assert AWS_TOKEN not in record.getMessage()
        assert AWS_TOKEN not in str(vars(record))


# --- a real client: botocore's IMDSv2 credential fetch through the relay ------------------------


async def test_botocore_imds_credentials_through_the_relay(
    make_settings: Callable[..., settings.Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    import botocore.session

    account = FakeAwsAccount()
    imds = FakeImds(account)
    async with (
        serving(imds.app()) as imds_url,
        run_broker(make_settings(imds_passthrough=imds_url)) as running,
    ):
        for key in list(os.environ):
            if key.startswith("AWS_"):
                monkeypatch.delenv(key)
        for key, value in {**ISOLATED_ENV, "AWS_EC2_METADATA_SERVICE_ENDPOINT": running.url + "/"}.items():
            monkeypatch.setenv(key, value)

        def fetch() -> tuple[str, str]:
            creds = botocore.session.get_session().get_credentials()
            assert creds is not None
            return creds.method, creds.get_frozen_credentials().access_key

        method, access_key = await asyncio.to_thread(fetch)
    assert method == "iam-role"
    assert access_key == account.current().access_key_id
    calls = [(c.method, c.path) for c in imds.calls]
    assert calls[0] == ("PUT", "/latest/api/token")
    assert ("GET", "/latest/meta-data/iam/security-credentials/") in calls
    assert ("GET", f"/latest/meta-data/iam/security-credentials/{account.role_name}") in calls
    assert all("x-forwarded-for" not in c.headers for c in imds.calls)
    assert all(c.headers.get("x-aws-ec2-metadata-token") in imds.tokens for c in imds.calls[1:])


# --- the setting --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://169.254.169.254", "http://169.254.169.254"),
        ("http://169.254.169.254/", "http://169.254.169.254"),
        ("http://[fd00:ec2::254]", "http://[fd00:ec2::254]"),
        ("http://127.0.0.2:8080/", "http://127.0.0.2:8080"),
    ],
)
def test_setting_accepts_a_base_url(
    make_settings: Callable[..., settings.Settings], value: str, expected: str
) -> None:
    assert make_settings(imds_passthrough=value).imds_passthrough == expected


def test_setting_is_off_by_default(make_settings: Callable[..., settings.Settings]) -> None:
    assert make_settings().imds_passthrough == ""


@pytest.mark.parametrize(
    "value", ["169.254.169.254", "ftp://169.254.169.254", "http://169.254.169.254/latest", "http://h/?q=1"]
)
def test_setting_refuses_what_is_not_a_base_url(
    make_settings: Callable[..., settings.Settings], value: str
) -> None:
    with pytest.raises(ConfigError, match="imds-passthrough"):
        make_settings(imds_passthrough=value)


def test_setting_refuses_the_brokers_own_address(make_settings: Callable[..., settings.Settings]) -> None:
    with pytest.raises(ConfigError, match=r"imds-passthrough.*loop"):
        make_settings(listen=["169.254.169.254:80"], imds_passthrough="http://169.254.169.254")

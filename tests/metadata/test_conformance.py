"""Black-box conformance: cases C01-C40 of reference/metadata-protocol.md §9.

Every test talks HTTP to the production daemon (the ``broker`` fixture) backed
by the strict fake Google upstreams, never to handler functions. Extra guards
at the end cover SPEC §3 points the table leaves implicit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from broker import settings
from broker.fakes import FakeGoogle
from tests.conftest import NUMBER, PROJECT, SA, ZONE, RunningBroker, run_broker

H = {"Metadata-Flavor": "Google"}
V1 = "/computeMetadata/v1"
TEXT = "application/text"
JSON = "application/json"
HTML = "text/html; charset=UTF-8"
SERVER = "Metadata Server for VM"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
USERINFO = "https://www.googleapis.com/auth/userinfo.email"
GCLOUD_AUDIENCE = "32555940559.apps.googleusercontent.com"
ETAG = re.compile(r"^[0-9a-f]+$")


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    history: tuple[aiohttp.ClientResponse, ...]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str:
        """The single value of ``name``; a missing or repeated header fails."""
        values = self.headers.getall(name, [])
        assert len(values) == 1, f"{name}: {values!r}"
        return values[0]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def fetch(
    session: aiohttp.ClientSession,
    url: str | URL,
    *,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    follow: bool = False,
) -> Reply:
    async with session.request(method, url, headers=headers, allow_redirects=follow) as resp:
        body = await resp.read()
        return Reply(resp.status, resp.headers, body, resp.history)


def assert_wire(reply: Reply) -> None:
    """The GCE header rules every response keeps (§4.2), errors and redirects included."""
    assert reply.header("Metadata-Flavor") == "Google"
    assert reply.header("Server") == SERVER
    assert int(reply.header("Content-Length")) == len(reply.body)


def assert_etag(reply: Reply) -> str:
    etag = reply.header("ETag")
    assert ETAG.match(etag), etag
    return etag


def assert_text_leaf(reply: Reply, expected: str) -> None:
    assert reply.status == 200
    assert_wire(reply)
    assert reply.header("Content-Type") == TEXT
    assert reply.text == expected  # exact: no trailing newline on leaves
    assert_etag(reply)


def assert_listing(reply: Reply) -> list[str]:
    assert reply.status == 200
    assert_wire(reply)
    assert reply.header("Content-Type") == TEXT
    assert_etag(reply)
    assert reply.text == "" or reply.text.endswith("\n")
    lines = reply.text.split("\n")[:-1]
    assert all(line and line == line.strip() for line in lines), lines
    return lines


def assert_token(reply: Reply, google: FakeGoogle) -> dict[str, Any]:
    assert reply.status == 200
    assert_wire(reply)
    assert reply.header("Content-Type") == JSON
    body = reply.json()
    assert isinstance(body, dict)
    assert set(body) == {"access_token", "expires_in", "token_type"}
    assert isinstance(body["access_token"], str)
    assert body["access_token"]
    assert body["access_token"] in google.iam.issued_access
    expires_in = body["expires_in"]
    assert type(expires_in) is int  # a JSON integer, not a float or a string
    assert 300 < expires_in <= 3600
    assert body["token_type"] == "Bearer"
    return body


def jwt_payload(token: str) -> dict[str, Any]:
    segments = token.split(".")
    assert len(segments) == 3, token
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", s) for s in segments), token
    payload = segments[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def sa(account: str, rest: str) -> str:
    return f"{V1}/instance/service-accounts/{account}/{rest}"


def generate_access_calls(google: FakeGoogle) -> list[Any]:
    return [c for c in google.iam.calls if c.path.endswith(":generateAccessToken")]


async def raw_request(host: str, request: str) -> tuple[str, dict[str, str], bytes]:
    """Send ``request`` verbatim and read to EOF: status line, headers, body bytes."""
    address, port = host.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(address, int(port))
    try:
        writer.write(request.encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"repeated header {name}"
        headers[name.lower()] = value.strip()
    return status, headers, body


# --- Detection: the root ---------------------------------------------------------------


async def test_c01_root_without_header(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}/")
    assert reply.status == 200
    assert_wire(reply)
    assert reply.header("Content-Type") == TEXT
    assert reply.text == "computeMetadata/\n"


async def test_c02_root_with_header(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}/", headers=H)
    assert reply.status == 200
    assert reply.headers.getall("Metadata-Flavor") == ["Google"]  # exact value, once
    assert_wire(reply)


async def test_c03_head_root(broker: RunningBroker) -> None:
    status, headers, body = await raw_request(
        broker.host, f"HEAD / HTTP/1.1\r\nHost: {broker.host}\r\nConnection: close\r\n\r\n"
    )
    assert status == "HTTP/1.1 200 OK"
    assert headers["metadata-flavor"] == "Google"
    assert headers["server"] == SERVER
    assert headers["content-type"] == TEXT
    assert headers["content-length"] == str(len("computeMetadata/\n"))
    assert body == b""


# --- Request guards ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "headers"),
    [
        ("c04_no_header", {}),
        ("c05_wrong_value", {"Metadata-Flavor": "google-ish"}),
        ("c06_forwarded", {**H, "X-Forwarded-For": "10.0.0.1"}),
    ],
)
async def test_c04_c05_c06_refused(
    broker: RunningBroker, http: aiohttp.ClientSession, case: str, headers: dict[str, str]
) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/project/project-id", headers=headers)
    assert reply.status == 403, case
    assert_wire(reply)
    assert PROJECT not in reply.text


# --- Values ------------------------------------------------------------------------------


async def test_c07_project_id(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/project/project-id", headers=H)
    assert_text_leaf(reply, PROJECT)
    assert len(reply.header("ETag")) >= 8


async def test_c08_numeric_project_id(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/project/numeric-project-id", headers=H)
    assert_text_leaf(reply, NUMBER)
    assert re.fullmatch(r"[0-9]+", reply.text)
    assert reply.text.isdigit()  # gcloud's detection


async def test_c09_zone(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/instance/zone", headers=H)
    assert_text_leaf(reply, f"projects/{NUMBER}/zones/{ZONE}")
    assert re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", reply.text.rsplit("/", 1)[1])


async def test_c10_instance_id(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/instance/id", headers=H)
    assert reply.status == 200
    assert_text_leaf(reply, reply.text)
    assert re.fullmatch(r"[0-9]+", reply.text)
    tree = (await fetch(http, f"{broker.url}{V1}/?recursive=true", headers=H)).json()
    assert tree["instance"]["id"] == int(reply.text)


# --- Service accounts ------------------------------------------------------------------


async def test_c11_service_accounts_listing(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/instance/service-accounts/", headers=H)
    lines = assert_listing(reply)
    assert sorted(lines) == sorted(["default/", f"{SA}/"])
    assert set(reply.text.split()) == {"default/", f"{SA}/"}  # gcloud's Accounts()


@pytest.mark.parametrize("host_header", [None, "metadata.google.internal"])
async def test_c12_service_accounts_redirect(
    broker: RunningBroker, http: aiohttp.ClientSession, host_header: str | None
) -> None:
    headers = dict(H) if host_header is None else {**H, "Host": host_header}
    reply = await fetch(http, f"{broker.url}{V1}/instance/service-accounts", headers=headers)
    assert reply.status == 301  # the server answers 301 here, not a 200 listing
    assert_wire(reply)
    assert reply.header("Content-Type") == HTML
    # SPEC §8: a relative Location that never echoes the client's Host (clients
    # resolve it against the URL they asked; metadata-protocol.md §1.9 allows it).
    assert reply.header("Location") == f"{V1}/instance/service-accounts/"


async def test_c13_c14_recursive_account_info(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    by_alias = await fetch(http, f"{broker.url}{sa('default', '?recursive=true')}", headers=H)
    assert by_alias.status == 200
    assert_wire(by_alias)
    assert by_alias.header("Content-Type") == JSON
    info = by_alias.json()
    assert isinstance(info, dict)
    assert info["email"] == SA
    scopes = info["scopes"]
    assert isinstance(scopes, list)
    assert scopes
    assert all(isinstance(s, str) and s for s in scopes)
    assert scopes == [CLOUD_PLATFORM]
    assert info["aliases"] == ["default"]

    by_email = await fetch(http, f"{broker.url}{sa(SA, '?recursive=true')}", headers=H)
    assert by_email.status == 200
    assert_wire(by_email)
    assert by_email.header("Content-Type") == JSON
    assert by_email.body == by_alias.body  # C14: byte-identical


@pytest.mark.parametrize("account", ["c15_default", "c16_email"])
async def test_c15_c16_email(broker: RunningBroker, http: aiohttp.ClientSession, account: str) -> None:
    name = "default" if account == "c15_default" else SA
    reply = await fetch(http, f"{broker.url}{sa(name, 'email')}", headers=H)
    assert_text_leaf(reply, SA)


async def test_c17_scopes(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{sa('default', 'scopes')}", headers=H)
    assert reply.status == 200
    assert_wire(reply)
    assert reply.header("Content-Type") == TEXT
    assert reply.text == f"{CLOUD_PLATFORM}\n"  # one per line, each line ends in \n


# --- Tokens ------------------------------------------------------------------------------


async def test_c18_token(broker: RunningBroker, google: FakeGoogle, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{sa('default', 'token')}", headers=H)
    assert_token(reply, google)
    assert reply.header("Content-Type") == JSON  # no charset: Python parses only this exact type


async def test_c19_token_with_scopes(
    broker: RunningBroker, google: FakeGoogle, http: aiohttp.ClientSession
) -> None:
    query = (
        "scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform"
        "%2Chttps%3A%2F%2Fwww.googleapis.com%2Fauth%2Fuserinfo.email"
    )
    url = URL(f"{broker.url}{sa('default', 'token')}?{query}", encoded=True)
    reply = await fetch(http, url, headers=H)
    assert_token(reply, google)
    # The requested scope set reached IAM, not the default one.
    asked = [sorted(c.json["scope"]) for c in generate_access_calls(google)]
    assert sorted([CLOUD_PLATFORM, USERINFO]) in asked


async def test_c20_token_by_email(
    broker: RunningBroker, google: FakeGoogle, http: aiohttp.ClientSession
) -> None:
    reply = await fetch(http, f"{broker.url}{sa(SA, 'token')}", headers=H)
    assert_token(reply, google)


async def test_c21_token_unknown_account(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{sa('other@x.iam.gserviceaccount.com', 'token')}", headers=H)
    assert reply.status == 404
    assert_wire(reply)


async def test_c22_token_extra_params(
    broker: RunningBroker, google: FakeGoogle, http: aiohttp.ClientSession
) -> None:
    url = f"{broker.url}{sa('default', 'token')}?scopes=x&transport=mtls&binding-enforcement=on&foo=1"
    reply = await fetch(http, url, headers=H)
    assert reply.status < 500
    assert_wire(reply)
    if reply.status == 200:
        assert_token(reply, google)
    else:
        assert 400 <= reply.status < 500


async def test_c23_token_trailing_slash(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{sa('default', 'token/')}", headers=H)
    assert reply.status == 404
    assert_wire(reply)


# --- Identity ----------------------------------------------------------------------------


async def test_c24_identity_without_audience(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{sa('default', 'identity')}", headers=H)
    assert reply.status == 400
    assert_wire(reply)


async def test_c25_identity_full(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    url = f"{broker.url}{sa('default', 'identity')}?audience=https://svc.example.com&format=full"
    reply = await fetch(http, url, headers=H)
    assert reply.status == 200
    assert_wire(reply)
    assert reply.header("Content-Type") == TEXT  # never application/json: Python would json.loads it
    assert "\n" not in reply.text
    claims = jwt_payload(reply.text)
    assert claims["aud"] == "https://svc.example.com"
    assert type(claims["exp"]) is int
    assert claims["exp"] > time.time()
    assert claims["email"] == SA  # format=full asks IAM for includeEmail (SPEC §4)


async def test_c26_identity_unencoded_audience(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    # Node sends the audience without URL-encoding; the bytes must reach the server as-is.
    raw = "format=full&audience=https://svc.example.com/path?x=1"
    url = URL(f"{broker.url}{sa('default', 'identity')}?{raw}", encoded=True)
    reply = await fetch(http, url, headers=H)
    assert reply.status < 500
    assert_wire(reply)
    if reply.status == 200:
        assert jwt_payload(reply.text)["aud"] == "https://svc.example.com/path?x=1"
    else:
        assert 400 <= reply.status < 500


async def test_c27_identity_gcloud_audience(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    url = f"{broker.url}{sa('default', 'identity')}?audience={GCLOUD_AUDIENCE}&format=standard&licenses=FALSE"
    reply = await fetch(http, url, headers=H)
    assert reply.status in (200, 404)  # gcloud aborts on 403 and 5xx
    assert_wire(reply)
    if reply.status == 200:
        assert reply.header("Content-Type") == TEXT
        claims = jwt_payload(reply.text)
        assert claims["aud"] == GCLOUD_AUDIENCE
        assert "email" not in claims  # format=standard


# --- Universe ------------------------------------------------------------------------


async def test_c28_universe_domain(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/universe/universe-domain", headers=H)
    assert_text_leaf(reply, "googleapis.com")


async def test_c29_universe_underscore(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/universe/universe_domain", headers=H)
    assert reply.status == 404  # SPEC §3 picks 404, as real GCE does
    assert_wire(reply)
    assert reply.header("Content-Type") == HTML


# --- Directories -------------------------------------------------------------------------


async def test_c30_instance_without_slash_follows(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    reply = await fetch(http, f"{broker.url}{V1}/instance", headers=H, follow=True)
    elapsed = time.monotonic() - started
    assert [r.status for r in reply.history] == [301]
    assert reply.history[0].headers.getall("Metadata-Flavor") == ["Google"]
    lines = assert_listing(reply)
    assert "service-accounts/" in lines
    assert elapsed < 3  # Node's isAvailable timeout; behaviour bound, not a benchmark


async def test_c31_instance_listing(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/instance/", headers=H)
    lines = assert_listing(reply)
    assert {"id", "service-accounts/", "zone", "attributes/"} <= set(lines)
    assert lines == sorted(lines)


async def test_c32_recursive_root(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/?recursive=true", headers=H)
    assert reply.status == 200
    assert_wire(reply)
    assert reply.header("Content-Type") == JSON
    assert int(reply.header("Content-Length")) < 512 * 1024  # gax-dotnet's limit
    tree = reply.json()
    assert tree["project"]["projectId"] == PROJECT
    assert type(tree["project"]["numericProjectId"]) is int
    assert tree["project"]["numericProjectId"] == int(NUMBER)
    assert type(tree["instance"]["id"]) is int
    assert tree["instance"]["zone"] == f"projects/{NUMBER}/zones/{ZONE}"
    assert tree["instance"]["serviceAccounts"]["default"]["email"] == SA
    assert tree["instance"]["serviceAccounts"][SA]["email"] == SA  # emails are data, not camelCased


async def test_c33_recursive_without_slash(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}?recursive=true", headers=H)
    assert reply.status == 301  # the server answers 301 here, not the JSON directly
    assert_wire(reply)
    assert reply.header("Location") == f"{V1}/?recursive=true"


async def test_c34_alt_json_leaf(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/project/project-id?alt=json", headers=H)
    assert reply.status == 200
    assert_wire(reply)
    assert reply.header("Content-Type") == JSON
    assert reply.text == f'"{PROJECT}"'


@pytest.mark.parametrize("path", ["/project?alt=json", "/project/?alt=json"])
async def test_c35_alt_json_directory(broker: RunningBroker, http: aiohttp.ClientSession, path: str) -> None:
    reply = await fetch(http, f"{broker.url}{V1}{path}", headers=H, follow=True)
    assert reply.status == 400
    assert_wire(reply)


async def test_c36_unknown_params_ignored(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/project/project-id?foo=bar&last_etag=abc", headers=H)
    assert_text_leaf(reply, PROJECT)


async def test_c37_unknown_path(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}{V1}/does/not/exist", headers=H)
    assert reply.status == 404
    assert_wire(reply)
    assert reply.header("Content-Type") == HTML


# --- ETag and wait_for_change ------------------------------------------------------------


async def test_c38_etag_stable_and_stale_etag_returns_at_once(
    broker: RunningBroker, http: aiohttp.ClientSession
) -> None:
    url = f"{broker.url}{V1}/project/project-id"
    first = await fetch(http, url, headers=H)
    second = await fetch(http, url, headers=H)
    etag = assert_etag(first)
    assert assert_etag(second) == etag
    other = "0" * len(etag) if etag != "0" * len(etag) else "1" * len(etag)
    started = time.monotonic()
    waited = await fetch(http, f"{url}?wait_for_change=true&last_etag={other}&timeout_sec=5", headers=H)
    elapsed = time.monotonic() - started
    assert_text_leaf(waited, PROJECT)
    assert waited.header("ETag") == etag
    assert elapsed < 2.5  # would be ~5 s if the stale etag were not honoured


async def test_c39_wait_for_change_blocks_until_timeout(
    broker: RunningBroker, http: aiohttp.ClientSession
) -> None:
    url = f"{broker.url}{V1}/project/project-id"
    etag = assert_etag(await fetch(http, url, headers=H))
    started = time.monotonic()
    reply = await fetch(http, f"{url}?wait_for_change=true&last_etag={etag}&timeout_sec=2", headers=H)
    elapsed = time.monotonic() - started
    assert_text_leaf(reply, PROJECT)
    assert reply.header("ETag") == etag
    assert 1.5 <= elapsed < 10


# --- Load and cache ----------------------------------------------------------------------


async def test_c40_concurrent_cold_start_single_flight(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings], http: aiohttp.ClientSession
) -> None:
    # Hold STS shut until every request is in flight, so all 50 (and the
    # start-up pre-warm) meet a truly cold cache at the same moment.
    google.sts.gate = asyncio.Event()
    async with run_broker(make_settings()) as running:
        url = f"{running.url}{sa('default', 'token')}"
        requests = [asyncio.create_task(fetch(http, url, headers=H)) for _ in range(50)]
        for _ in range(1000):  # up to ~10 s for the first exchange to reach the gate
            if google.sts.calls:
                break
            await asyncio.sleep(0.01)
        assert len(google.sts.calls) == 1
        # While the upstream is stuck, detection pings still answer at once.
        started = time.monotonic()
        ping = await fetch(http, f"{running.url}/")
        assert ping.status == 200
        assert time.monotonic() - started < 3
        await asyncio.sleep(0.2)  # let the remaining requests reach the server
        assert not any(task.done() for task in requests)
        google.sts.gate.set()
        replies = await asyncio.wait_for(asyncio.gather(*requests), timeout=30)

        bodies = [assert_token(reply, google) for reply in replies]
        assert len({b["access_token"] for b in bodies}) == 1
        assert len(google.sts.calls) == 1
        assert len(generate_access_calls(google)) == 1

        first = assert_token(await fetch(http, url, headers=H), google)
        await asyncio.sleep(1.1)
        second = assert_token(await fetch(http, url, headers=H), google)
        assert second["access_token"] == first["access_token"] == bodies[0]["access_token"]
        assert second["expires_in"] < first["expires_in"]
        assert len(google.sts.calls) == 1
        assert len(generate_access_calls(google)) == 1


# --- Extra SPEC §3 guards ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", f"{V1}/instance/service-accounts/default/token"])
async def test_extra_post_is_4xx(broker: RunningBroker, http: aiohttp.ClientSession, path: str) -> None:
    reply = await fetch(http, f"{broker.url}{path}", headers=H, method="POST")
    assert 400 <= reply.status < 500
    assert_wire(reply)
    if reply.status == 405:
        assert reply.header("Allow") == "GET, HEAD"


@pytest.mark.parametrize("headers", [{}, H])
@pytest.mark.parametrize("path", ["/latest/meta-data/", "/metadata/instance", "/computeMetadataX"])
async def test_extra_outside_compute_metadata_is_404(
    broker: RunningBroker, http: aiohttp.ClientSession, path: str, headers: dict[str, str]
) -> None:
    reply = await fetch(http, f"{broker.url}{path}", headers=headers)
    assert reply.status == 404
    assert_wire(reply)


async def test_extra_forwarded_root_is_403(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    reply = await fetch(http, f"{broker.url}/", headers={"X-Forwarded-For": "10.0.0.1"})
    assert reply.status == 403
    assert_wire(reply)


async def test_extra_instance_attributes(broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    listing = await fetch(http, f"{broker.url}{V1}/instance/attributes/", headers=H)
    assert "kube-env" not in assert_listing(listing)
    concealed = await fetch(http, f"{broker.url}{V1}/instance/attributes/kube-env", headers=H)
    assert concealed.status == 404
    assert_wire(concealed)


async def test_extra_header_name_is_case_insensitive(broker: RunningBroker) -> None:
    # Python's google-auth sends the name lower-cased; aiohttp's client would keep
    # our spelling too, but a raw request leaves no doubt about the bytes sent.
    status, headers, body = await raw_request(
        broker.host,
        f"GET {V1}/project/project-id HTTP/1.1\r\nHost: {broker.host}\r\n"
        "metadata-flavor: Google\r\nConnection: close\r\n\r\n",
    )
    assert status == "HTTP/1.1 200 OK"
    assert headers["metadata-flavor"] == "Google"
    assert headers["content-type"] == TEXT
    assert body == PROJECT.encode()

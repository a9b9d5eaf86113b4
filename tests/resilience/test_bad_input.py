"""Property-based: arbitrary paths, queries, methods and headers never break the metadata server.

One broker (production ``daemon.serve`` against FakeGoogle) runs in a background
thread with its own event loop for the whole module; hypothesis drives it with
plain blocking ``http.client`` requests from the test thread. For every request:

* the status is below 500 and the GCE wire headers are present;
* no token (``ya29.…`` access token or an ID-token JWT) is in the response unless
  the request carried ``Metadata-Flavor: Google`` and no ``X-Forwarded-For``.
"""

from __future__ import annotations

import asyncio
import http.client
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.fakes import FakeGoogle
from tests.conftest import SA
from tests.resilience._support import TOKEN_PATH, WAIT, ready_broker, write_settings


@dataclass
class Background:
    host: str
    port: int
    google: FakeGoogle


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = box["stop"] = asyncio.Event()
        box["loop"] = asyncio.get_running_loop()
        async with FakeGoogle() as google:
            resolved = write_settings(tmp_path_factory.mktemp("fuzz"), google)
            async with ready_broker(resolved) as broker:
                host, port = broker.host.rsplit(":", 1)
                box["broker"] = Background(host, int(port), google)
                started.set()
                await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            box["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, name="fuzzed-broker", daemon=True)
    thread.start()
    started.wait(WAIT * 2)
    if "broker" not in box:
        raise RuntimeError(f"the background broker did not start: {box.get('error')!r}")
    try:
        yield box["broker"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(WAIT)
    assert not thread.is_alive(), "the background broker did not stop"
    assert "error" not in box, box.get("error")


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    @property
    def may_get_a_token(self) -> bool:
        """SPEC §3 and §8: one ``Metadata-Flavor: Google``, a Host naming the broker,
        no proxy or browser header."""
        flavor = [v.strip(" \t") for k, v in self.headers if k.lower() == "metadata-flavor"]
        refused = any(k.lower() in REFUSED_NAMES for k, _ in self.headers)
        hosts = [v for k, v in self.headers if k.lower() == "host"]
        return flavor == ["Google"] and not refused and len(hosts) == 1 and hosts[0] in GOOD_HOSTS


# Printable ASCII but space: what http.client lets into a request target (no "#": a fragment).
TARGET_CHARS = "".join(c for c in string.printable if c not in string.whitespace and c != "#")
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
HEADER_VALUE_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
SEGMENTS = [
    "computeMetadata",
    "v1",
    "v1beta1",
    "instance",
    "project",
    "service-accounts",
    "default",
    SA,
    "token",
    "identity",
    "email",
    "scopes",
    "aliases",
    "attributes",
    "project-id",
    "numeric-project-id",
    "zone",
    "id",
    "hostname",
    "universe",
    "universe-domain",
    "universe_domain",
    "",
    ".",
    "..",
    "%2e%2e",
    "%2F",
    "%00",
    "%ff",
    "%",
    "TOKEN",
    "computemetadata",
]
QUERY_KEYS = [
    "scopes",
    "audience",
    "format",
    "licenses",
    "alt",
    "recursive",
    "wait_for_change",
    "last_etag",
    "timeout_sec",
    "",
]
QUERY_VALUES = [
    "true",
    "TRUE",
    "false",
    "json",
    "text",
    "full",
    "standard",
    "",
    "-1",
    "99999999999999999999999",
    "https://www.googleapis.com/auth/cloud-platform",
    "https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform%2Cb",
    "32555940559.apps.googleusercontent.com",
    "%zz",
    "a,,b,%20,",
]
REFUSED_NAMES = {
    "x-forwarded-for",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
    "via",
    "origin",
    "sec-fetch-site",
    "sec-fetch-mode",
}
GOOD_HOSTS = [
    "localhost",
    "127.0.0.1:8988",
    "Metadata.Google.Internal",
    "metadata.google.internal.",
    "[::1]:80",
]
BAD_HOSTS = [
    "rebind.attacker.example",
    "127.0.0.1.nip.io",
    "metadata.google.internal.evil",
    "",
    "[::2]",
    "a:b",
]
# Framing and hop-by-hop headers would make the request something other than one GET.
RESERVED = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "expect",
    "te",
    "keep-alive",
}

free_text = st.text(alphabet=TARGET_CHARS, max_size=24)
segment = st.one_of(st.sampled_from(SEGMENTS), free_text.map(lambda s: s.replace("/", "")))
path = st.one_of(
    st.lists(segment, max_size=4).map(lambda s: "/computeMetadata/v1/" + "/".join(s)),
    st.lists(segment, max_size=4).map(
        lambda s: "/computeMetadata/v1/instance/service-accounts/" + "/".join(s)
    ),
    st.lists(segment, max_size=7).map(lambda s: "/" + "/".join(s)),
    st.just(TOKEN_PATH),
)
pair = st.tuples(
    st.one_of(st.sampled_from(QUERY_KEYS), free_text),
    st.one_of(st.sampled_from(QUERY_VALUES), free_text),
)
query = st.one_of(
    st.just(""),
    st.lists(pair, max_size=5).map(lambda kv: "?" + "&".join(f"{k}={v}" for k, v in kv)),
    free_text.map(lambda s: "?" + s),
)
flavor = st.lists(
    st.tuples(
        st.sampled_from(["Metadata-Flavor", "metadata-flavor", "METADATA-FLAVOR"]),
        st.sampled_from(["Google", "google", "GOOGLE", " Google ", "", "Goo gle", "Google, Google", "Other"]),
    ),
    max_size=2,
)
forwarded = st.lists(
    st.tuples(
        st.sampled_from(
            ["X-Forwarded-For", "x-forwarded-for", "X-Real-IP", "Forwarded", "Via", "X-Forwarded-Host"]
        ),
        st.sampled_from(["203.0.113.9", "127.0.0.1", "", "unknown, 10.0.0.1", "1.1 wif-broker"]),
    ),
    max_size=1,
)
browser = st.lists(
    st.tuples(
        st.sampled_from(["Origin", "Sec-Fetch-Site", "sec-fetch-mode"]),
        st.sampled_from(["null", "http://rebind.attacker.example", "cross-site", "same-origin", "no-cors"]),
    ),
    max_size=1,
)
# The client's own Host (http.client's is skipped): mostly good, sometimes a rebinding name.
host = st.one_of(st.sampled_from(GOOD_HOSTS), st.sampled_from(BAD_HOSTS)).map(lambda h: [("Host", h)])
other = st.lists(
    st.tuples(
        st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=16).filter(lambda n: n.lower() not in RESERVED),
        st.text(alphabet=HEADER_VALUE_CHARS, max_size=40),
    ),
    max_size=4,
)
requests = st.builds(
    lambda method, target, headers: Request(method, target, tuple(headers)),
    st.sampled_from(["GET"] * 6 + ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "PROPFIND"]),
    st.builds(lambda p, q: p + q, path, query),
    st.builds(
        lambda *parts: [h for part in parts for h in part], host, flavor, forwarded, browser, other
    ).flatmap(st.permutations),
)


def send(broker: Background, request: Request) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(broker.host, broker.port, timeout=WAIT)
    try:
        conn.putrequest(request.method, request.target, skip_host=True, skip_accept_encoding=True)
        for name, value in request.headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def has_token(body: bytes) -> bool:
    # Access tokens from the fakes start "ya29."; ID tokens are JWTs ({"alg" → "eyJ").
    return b"ya29." in body or b"eyJ" in body


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=requests)
def test_no_request_gets_a_5xx_or_an_unearned_token(background: Background, request: Request) -> None:
    status, headers, body = send(background, request)
    assert status < 500, (status, body[:300])
    assert headers.get("Metadata-Flavor") == "Google", headers
    assert headers.get("Server") == "Metadata Server for VM", headers
    if not request.may_get_a_token:
        assert not has_token(body), (status, body[:300])
    elif request.method == "GET" and request.target == TOKEN_PATH:
        # The guard refuses no more than it must: an allowed request gets its token.
        assert status == 200, (status, body[:300])
        assert b"ya29." in body


def test_the_broker_still_serves_after_the_fuzzing(background: Background) -> None:
    status, _, body = send(
        background, Request("GET", TOKEN_PATH, (("Host", "localhost"), ("Metadata-Flavor", "Google")))
    )
    assert status == 200, body
    assert b"ya29." in body

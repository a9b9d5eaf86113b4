"""Upstreams that hang or answer nonsense: clients get 503 naming the step, never a 500.

Hangs use the fakes' ``gate`` (the request is received and never answered). The
broker here is the production metadata app over a TokenChain whose outbound
session has a 2 s ClientTimeout (``serve_chain``): ``httpclient.request`` uses
the session's timeout unless a caller passes its own, so no broker code is
patched to make the timeout fire quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from broker import settings
from broker.clock import ManualClock
from broker.fakes import FakeGoogle
from broker.httpclient import MAX_BODY
from tests.conftest import credential_info
from tests.resilience._support import (
    IDENTITY_PATH,
    POLICY_BACKOFF_CAP,
    eventually,
    get,
    serve_chain,
    token,
    write_settings,
)

SHORT = aiohttp.ClientTimeout(total=2.0)
STEP_OF = {"sts": "sts", "iam": "iam_generate_access_token"}
CLIENTS = 50
ROUNDS = 2


@pytest.mark.parametrize("service", ["sts", "iam"])
async def test_hung_upstream_times_out_and_tasks_do_not_pile_up(
    service: str, google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    """The fake accepts every request and never answers. Each round of 50 concurrent
    clients shares one upstream call (single-flight), which the outbound timeout ends:
    all 50 get 503 "timed out" naming the step. No task is left behind per client
    request: the loop holds only the fake's own parked handlers. Once the fake answers
    again, the next request succeeds."""
    fake = google.sts if service == "sts" else google.iam
    fake.gate = asyncio.Event()
    try:
        async with (
            aiohttp.ClientSession(timeout=SHORT) as session,
            serve_chain(make_settings(), session) as url,
        ):
            baseline = len(asyncio.all_tasks())
            for _ in range(ROUNDS):
                answers = await asyncio.gather(*(token(url) for _ in range(CLIENTS)))
                for answer in answers:
                    assert answer.status == 503, answer.text
                    assert answer.text.startswith(
                        f"{STEP_OF[service]} failed: timed out talking to 127.0.0.1:"
                    )
            assert 1 <= len(fake.calls) <= ROUNDS, "one upstream call per round, shared by every client"
            # Allowed: per parked upstream call the fake's handler and connection tasks, plus
            # a few fixed ones (keep-alive connections to the fakes, refresh loops). A task per
            # client request (100 here) would be a pile-up.
            allowed = baseline + 2 * len(fake.calls) + 4

            async def settled() -> bool:
                return len(asyncio.all_tasks()) <= allowed

            await eventually(settled, f"tasks piled up: {len(asyncio.all_tasks())} > {allowed}")
            fake.gate.set()

            async def recovered() -> bool:
                answer = await token(url)
                assert answer.status in (200, 503), answer.text
                return answer.status == 200

            await eventually(recovered, "no token once the upstream answered again")
    finally:
        fake.gate.set()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (service, status, body, reason the 503 names). Bodies are sent verbatim.
GARBAGE = [
    ("sts", 200, "<html>Service Unavailable</html>", "response is not a token JSON object"),
    ("sts", 200, '{"token_type": "Bearer", "expires_in": 3599}', "response is not a token JSON object"),
    ("sts", 200, '["access_token", 3599]', "response is not a token JSON object"),
    ("sts", 200, '{"access_token": "", "expires_in": 3599}', "response has an empty access_token"),
    ("sts", 200, '{"access_token": 42, "expires_in": 3599}', "response has an empty access_token"),
    ("sts", 200, '{"access_token": "ya29.x", "expires_in": "soon"}', "response is not a token JSON object"),
    ("sts", 200, '{"access_token": "ya29.x", "expires_in": NaN}', "response is not a token JSON object"),
    ("sts", 200, '{"access_token": "ya29.x", "expires_in": -1}', "invalid expires_in -1"),
    ("sts", 200, '{"access_token": "ya29.x", "expires_in": 10}', "not more than min-serve-ttl"),
    ("sts", 200, "x" * (MAX_BODY + 1), f"larger than {MAX_BODY} bytes"),
    ("sts", 200, nested(400_000), "response is not a token JSON object"),
    ("sts", 503, nested(400_000), "(HTTP 503)"),
    ("sts", 503, "x" * (4 * MAX_BODY), f"larger than {MAX_BODY} bytes"),
    ("iam", 200, "garbage", "response is not an access token object"),
    ("iam", 200, '{"accessToken": "ya29.x"}', "response is not an access token object"),
    (
        "iam",
        200,
        '{"accessToken": "ya29.x", "expireTime": "tomorrow"}',
        "response is not an access token object",
    ),
    (
        "iam",
        200,
        '{"accessToken": null, "expireTime": "2999-01-01T00:00:00Z"}',
        "response has an empty accessToken",
    ),
    (
        "iam",
        200,
        '{"accessToken": "ya29.x", "expireTime": "2000-01-01T00:00:00Z"}',
        "not more than min-serve-ttl",
    ),
    ("iam", 200, "x" * (MAX_BODY + 1), f"larger than {MAX_BODY} bytes"),
    ("iam", 200, nested(400_000), "response is not an access token object"),
    ("iam", 500, nested(400_000), "(HTTP 500)"),
]

# Bodies that once escaped the parsers' except clauses as 500s (overflow, wrong types).
ESCAPING = [
    pytest.param(
        "sts",
        200,
        '{"access_token": "ya29.x", "expires_in": 1e400}',
        "response is not a token JSON object",
        id="sts-expires_in-overflows-float",
    ),
    pytest.param(
        "sts",
        200,
        '{"access_token": "ya29.x", "expires_in": 1' + "0" * 400 + "}",
        "response is not a token JSON object",
        id="sts-expires_in-huge-int",
    ),
    pytest.param(
        "iam",
        200,
        '{"accessToken": "ya29.x", "expireTime": 1893456000}',
        "response is not an access token object",
        id="iam-expireTime-not-a-string",
    ),
]


@pytest.mark.parametrize(
    ("service", "status", "body", "reason"),
    [*(pytest.param(*case, id=f"{case[0]}-{case[1]}-{i}") for i, case in enumerate(GARBAGE)), *ESCAPING],
)
async def test_garbage_and_oversized_bodies_are_transient_503s(
    service: str,
    status: int,
    body: str,
    reason: str,
    google: FakeGoogle,
    make_settings: Callable[..., settings.Settings],
) -> None:
    fake = google.sts if service == "sts" else google.iam
    fake.fail_next(status, body, count=5)
    timeout = aiohttp.ClientTimeout(total=15)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        serve_chain(make_settings(), session) as url,
    ):
        answer = await token(url)
    assert answer.status == 503, answer.text
    assert answer.text.startswith(f"{STEP_OF[service]} failed"), answer.text
    assert reason in answer.text, answer.text
    assert answer.headers.get("Metadata-Flavor") == "Google"
    assert len(answer.text) < 2000, "the upstream's body is not echoed at length"


async def test_garbage_id_token_is_a_503_not_a_500(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    """generateIdToken answering a non-JWT or an oversized body."""
    for body in ('{"token": "not-a-jwt"}', '{"token": 7}', "x" * (MAX_BODY + 1), nested(400_000)):
        google.iam.fail_next(200, body)
        async with aiohttp.ClientSession() as session, serve_chain(make_settings(), session) as url:
            answer = await get(url + IDENTITY_PATH, audience="https://a.example")
        assert answer.status == 503, answer.text
        assert answer.text.startswith("iam_generate_id_token failed"), answer.text


async def test_subject_token_file_unusable_is_a_503_naming_the_step(
    tmp_path: Path, google: FakeGoogle
) -> None:
    """A token file that is empty (mid-write), a directory, or missing. The clock moves past
    the backoff between the cases, so each answer is a fresh attempt."""
    path = tmp_path / "projected" / "token"
    resolved = write_settings(tmp_path, google, path)
    clock = ManualClock()
    async with aiohttp.ClientSession() as session, serve_chain(resolved, session, clock) as url:
        path.parent.mkdir()
        path.write_text("")
        empty = await token(url)
        path.unlink()
        path.mkdir()
        await clock.advance(POLICY_BACKOFF_CAP + 1)
        directory = await token(url)
        path.rmdir()
        await clock.advance(POLICY_BACKOFF_CAP + 1)
        missing = await token(url)
    for answer, reason in (
        (empty, "holds an empty token"),
        (directory, "cannot read"),
        (missing, "does not exist"),
    ):
        assert answer.status == 503, answer.text
        assert answer.text.startswith("subject_token failed"), answer.text
        assert reason in answer.text, answer.text
    assert not google.sts.calls


async def test_valid_reply_arriving_in_many_chunks_is_read_whole(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    """A legitimate token object padded to 900 KB arrives in many reads; it is under the
    bound, so it must be parsed whole rather than cut at the first chunk."""
    padded = '{"accessToken": "ya29.padded", "expireTime": "2999-01-01T00:00:00Z"' + " " * 900_000 + "}"
    google.iam.fail_next(200, padded)
    async with aiohttp.ClientSession() as session, serve_chain(make_settings(), session) as url:
        answer = await token(url)
    assert answer.status == 200, answer.text
    assert answer.access_token == "ya29.padded"


async def test_endless_chunked_body_is_cut_at_the_bound(tmp_path: Path, google: FakeGoogle) -> None:
    """An STS stand-in (``token-url``) streaming a chunked body with no Content-Length and
    no end: the broker stops reading past MAX_BODY and answers 503 naming sts."""
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * 65536
        with contextlib.suppress(ConnectionError):
            while sent < 64 * MAX_BODY:
                await response.write(chunk)
                sent += len(chunk)
        return response

    app = web.Application()
    app.router.add_post("/v1/token", endless)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        resolved = write_settings(tmp_path, google, token_url=f"http://{host}:{port}/v1/token")
        async with aiohttp.ClientSession() as session, serve_chain(resolved, session) as url:
            answer = await token(url)
    finally:
        await runner.cleanup()
    assert answer.status == 503, answer.text
    assert answer.text.startswith(f"sts failed: response from {host}:{port} is larger than {MAX_BODY} bytes")
    assert sent < 64 * MAX_BODY, "the broker read the whole stream"


async def test_deeply_nested_json_token_file_is_a_503(tmp_path: Path, google: FakeGoogle) -> None:
    """A ``format: json`` token file (or URL source body) nested 400,000 deep."""
    path = tmp_path / "token.json"
    path.write_text(nested(400_000))
    info = credential_info(google, path)
    info["credential_source"]["format"] = {"type": "json", "subject_token_field_name": "access_token"}
    cred = tmp_path / "json-credentials.json"
    cred.write_text(json.dumps(info))
    resolved = write_settings(tmp_path, google, path, credentials=str(cred))
    async with aiohttp.ClientSession() as session, serve_chain(resolved, session) as url:
        answer = await token(url)
    assert answer.status == 503, answer.text
    assert answer.text.startswith("subject_token failed"), answer.text

"""SPEC §8 "bad input is a 4xx, never a 500", against the real daemon over real sockets.

* ``timeout_sec`` that is not 1-6 ASCII digits → 400;
* an upstream token (STS ``access_token``, IAM ``accessToken`` / ``token``) with
  characters a header value cannot carry → 503 naming the step, and SIGTERM still
  exits 0 (a real ``python -m broker run`` process for that one);
* a loader that raises something unexpected → 503 naming the step.

The misbehaving upstream is the strict fake answering a canned 200 (``fail_next``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.chain import TokenChain
from broker.clock import SystemClock
from broker.fakes import FakeGoogle
from broker.metadata.app import create_metadata_app
from tests.conftest import run_broker
from tests.resilience._support import IDENTITY_PATH, TOKEN_PATH, Outage, get, ready_broker, write_settings

V1 = "/computeMetadata/v1"
LEAF = f"{V1}/project/project-id"
STS_REPLY = {
    "access_token": "ya29.fake",
    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
    "token_type": "Bearer",
    "expires_in": 3600,
}
BAD_TOKENS = [
    "ya29.a\r\nX-Injected: 1",
    "ya29.a\nb",
    "ya29.\x00",
    "ya29.a b",
    "ya29.\x7f",
    "ya29.é",
    "ya29.\u2028",
]


BAD_TIMEOUTS = ["²", "9" * 5000, "-1", "1e3", "", "1234567", " 1", "0x10", "\u0661"]


async def test_a_bad_timeout_sec_is_400(tmp_path: Path) -> None:
    async with FakeGoogle() as google, ready_broker(write_settings(tmp_path, google)) as broker:
        for value in BAD_TIMEOUTS:
            # last_etag NONE and a current one: the check comes before the etag comparison.
            for etag in ("NONE", "0"):
                answer = await get(
                    broker.url + LEAF, wait_for_change="true", last_etag=etag, timeout_sec=value
                )
                assert answer.status == 400, (value[:20], answer.text)
                assert answer.headers["Metadata-Flavor"] == "Google"
        good = await get(broker.url + LEAF, wait_for_change="true", last_etag="NONE", timeout_sec="1")
        assert good.status == 200


@pytest.mark.parametrize("value", BAD_TOKENS)
async def test_an_sts_token_that_cannot_be_a_header_is_503_naming_sts(tmp_path: Path, value: str) -> None:
    async with FakeGoogle() as google:
        resolved = write_settings(tmp_path, google, impersonate=False)
        Outage(google.sts, 200, {**STS_REPLY, "access_token": value})
        async with run_broker(resolved) as broker:
            for _ in range(2):  # the pre-warm's failure and a fresh one
                answer = await get(broker.url + TOKEN_PATH)
                assert answer.status == 503, answer.text
                assert answer.text.startswith("sts failed"), answer.text
                assert value not in answer.text


@pytest.mark.parametrize("value", BAD_TOKENS)
async def test_an_iam_token_that_cannot_be_a_header_is_503_naming_iam(tmp_path: Path, value: str) -> None:
    async with FakeGoogle() as google:
        resolved = write_settings(tmp_path, google)
        Outage(google.iam, 200, {"accessToken": value, "expireTime": "2999-01-01T00:00:00Z", "token": value})
        async with run_broker(resolved) as broker:
            answer = await get(broker.url + TOKEN_PATH)
            assert answer.status == 503, answer.text
            assert answer.text.startswith("iam_generate_access_token failed"), answer.text
            identity = await get(broker.url + IDENTITY_PATH, audience="https://example.com", format="full")
            assert identity.status == 503, identity.text
            assert identity.text.startswith("iam_generate_id_token failed"), identity.text


class _Exploding:
    """A subject-token source with a bug: the interface SubjectTokenSource, nothing patched."""

    kind = "exploding"

    async def subject_token(self) -> str:
        raise RuntimeError("a bug, quoting a secret: ya29.secret")

    async def describe(self) -> dict[str, str]:
        return {}

    async def close(self) -> None:
        return None


async def test_an_unexpected_exception_in_a_loader_is_503_naming_the_step(tmp_path: Path) -> None:
    async with FakeGoogle() as google, aiohttp.ClientSession() as session:
        resolved = write_settings(tmp_path, google)
        clock = SystemClock()
        chain = TokenChain(resolved, _Exploding(), session, clock)
        runner = aiohttp.web.AppRunner(create_metadata_app(resolved, chain, clock), access_log=None)
        await runner.setup()
        try:
            await aiohttp.web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            answer = await get(f"http://{host}:{port}{TOKEN_PATH}")
        finally:
            await runner.cleanup()
            await chain.close()
    assert answer.status == 503, answer.text
    assert answer.text.startswith("subject_token failed"), answer.text
    assert "RuntimeError" in answer.text
    assert "ya29.secret" not in answer.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_sigterm_exits_0_after_a_crlf_token(tmp_path: Path) -> None:
    async with FakeGoogle() as google:
        token_path = tmp_path / "subject-token"
        token_path.write_text(google.subject_token(lifetime_seconds=7200))
        cred = tmp_path / "credentials.json"
        cred.write_text(json.dumps(google.credential_info(str(token_path), impersonate=True)))
        Outage(google.sts, 200, {**STS_REPLY, "access_token": "ya29.a\r\nb"})
        port, admin = _free_port(), _free_port()
        env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("WIF_BROKER_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker",
            "run",
            "--credentials",
            str(cred),
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            f"127.0.0.1:{admin}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            answer = None
            for _ in range(200):
                try:
                    answer = await get(f"http://127.0.0.1:{port}{TOKEN_PATH}")
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            assert answer is not None, "the broker never answered"
            assert answer.status == 503, answer
            assert answer.text.startswith("sts failed")
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), timeout=15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in stderr

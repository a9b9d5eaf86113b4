"""The fake Cloud Storage itself: the bearer check that makes the client tests meaningful."""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.clients._storage import loopback_tls
from tests.fakes.gcs import FakeGcs, crc32c

GOOD = "ya29.good"


@pytest.fixture
async def gcs() -> AsyncIterator[FakeGcs]:
    fake = FakeGcs(lambda token: token == GOOD)
    fake.put("b", "dir/one.txt", b"one")
    fake.put("b", "two.txt", b"two")
    async with fake:
        yield fake


async def get(url: str, token: str | None = GOOD) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.mark.parametrize("token", [None, "ya29.not-issued"])
async def test_rejects_missing_or_unknown_bearer(gcs: FakeGcs, token: str | None) -> None:
    status, headers, body = await get(f"{gcs.url}/storage/v1/b/b/o", token)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert b'"UNAUTHENTICATED"' in body
    assert gcs.bearers == ([token] if token else [])
    assert len(gcs.calls) == 1


async def test_lists_with_prefix_and_delimiter(gcs: FakeGcs) -> None:
    async with aiohttp.ClientSession() as session:
        auth = {"Authorization": f"Bearer {GOOD}"}
        async with session.get(f"{gcs.url}/storage/v1/b/b/o", headers=auth) as response:
            flat = await response.json()
        async with session.get(
            f"{gcs.url}/storage/v1/b/b/o", params={"delimiter": "/"}, headers=auth
        ) as response:
            top = await response.json()
    assert [item["name"] for item in flat["items"]] == ["dir/one.txt", "two.txt"]
    assert [item["name"] for item in top["items"]] == ["two.txt"]
    assert top["prefixes"] == ["dir/"]
    assert gcs.bearers == [GOOD, GOOD]


async def test_object_metadata_and_download_agree(gcs: FakeGcs) -> None:
    status, _, meta_body = await get(f"{gcs.url}/storage/v1/b/b/o/dir%2Fone.txt")
    assert status == 200
    status, headers, data = await get(f"{gcs.url}/download/storage/v1/b/b/o/dir%2Fone.txt?alt=media")
    assert status == 200
    assert data == b"one"
    md5 = base64.b64encode(hashlib.md5(b"one").digest()).decode()
    assert f"md5={md5}" in headers["x-goog-hash"]
    assert f'"md5Hash": "{md5}"' in meta_body.decode()
    status, _, media = await get(f"{gcs.url}/storage/v1/b/b/o/dir%2Fone.txt?alt=media")
    assert (status, media) == (200, b"one")


@pytest.mark.parametrize("path", ["/storage/v1/b/nope/o", "/storage/v1/b/b/o/missing", "/storage/v1/b/nope"])
async def test_unknown_bucket_or_object_is_404(gcs: FakeGcs, path: str) -> None:
    status, _, _ = await get(f"{gcs.url}{path}")
    assert status == 404


def test_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


async def test_serves_tls_with_the_loopback_certificate(tmp_path: Path) -> None:
    context, cert = loopback_tls(tmp_path)
    fake = FakeGcs(lambda token: token == GOOD, ssl_context=context)
    fake.put("b", "x", b"x")
    client_context = ssl.create_default_context(cafile=str(cert))
    async with fake, aiohttp.ClientSession() as session:
        assert fake.url.startswith("https://127.0.0.1:")
        auth = {"Authorization": f"Bearer {GOOD}"}
        async with session.get(f"{fake.url}/storage/v1/b/b", headers=auth, ssl=client_context) as response:
            assert response.status == 200
            assert (await response.json())["name"] == "b"

"""Daemon life-cycle: every task it starts is owned and gone after it drains."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from broker import settings
from broker.fakes import FakeGoogle
from tests.conftest import run_broker

MF = {"Metadata-Flavor": "Google"}
SA_PATH = "/computeMetadata/v1/instance/service-accounts/default"


async def test_no_task_outlives_the_daemon(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    before = {t for t in asyncio.all_tasks() if not t.done()}
    session = aiohttp.ClientSession()
    async with run_broker(make_settings()) as broker:
        # Populate every cache so each has a refresher task, and leave a long-poll open.
        for query in ({}, {"scopes": "https://www.googleapis.com/auth/a"}):
            async with session.get(f"{broker.url}{SA_PATH}/token", headers=MF, params=query) as resp:
                assert resp.status == 200
        async with session.get(
            f"{broker.url}{SA_PATH}/identity", headers=MF, params={"audience": "https://x.example"}
        ) as resp:
            assert resp.status == 200
        async with session.get(f"{broker.url}/computeMetadata/v1/project/project-id", headers=MF) as resp:
            etag = resp.headers["ETag"]
        poll = asyncio.create_task(
            session.get(
                f"{broker.url}/computeMetadata/v1/project/project-id",
                headers=MF,
                params={"wait_for_change": "true", "last_etag": etag, "timeout_sec": "300"},
            )
        )
        await asyncio.sleep(0.1)
        during = {t for t in asyncio.all_tasks() if not t.done()} - before
        assert len(during) >= 4, "expected refresher tasks for federated, two access and one ID token"
    # Leaving run_broker drained the daemon; the long-poll was released, not cut.
    response = await asyncio.wait_for(poll, timeout=5)
    assert response.status == 200
    response.release()
    await session.close()
    await asyncio.sleep(0)
    leftover = {t for t in asyncio.all_tasks() if not t.done()} - before - {asyncio.current_task()}
    assert leftover == set(), [t.get_coro() for t in leftover]

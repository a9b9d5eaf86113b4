from __future__ import annotations

import aiohttp

from tests.conftest import SA, RunningBroker


async def test_token_served_through_real_http(broker: RunningBroker) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{broker.url}/computeMetadata/v1/instance/service-accounts/default/token",
            headers={"Metadata-Flavor": "Google"},
        ) as resp:
            assert resp.status == 200
            body = await resp.json(content_type="application/json")
        async with session.get(
            f"{broker.url}/computeMetadata/v1/instance/service-accounts/default/email",
            headers={"Metadata-Flavor": "Google"},
        ) as resp:
            assert await resp.text() == SA
    assert body["access_token"].startswith("ya29.fake-iam-")
    assert body["token_type"] == "Bearer"

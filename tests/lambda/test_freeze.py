"""Lambda's freeze, simulated with SIGSTOP/SIGCONT (SPEC §10).

Between invokes Lambda stops every process in the sandbox: wall time moves on, no
timer fires. Tokens here live 10 s (refresh-before 4 s, min-serve-ttl 2 s); the
extension is frozen right after init, as Lambda freezes a sandbox until its first
invoke, and thawed when the default token is no longer servable. The invoke must
make the extension refresh before it asks for the next event, and the function,
running meanwhile, must never get a token with less than min-serve-ttl left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp

from ._sandbox import TOKEN_PATH, exit_status, extension, sandbox

LIFETIME = 10
MIN_SERVE_TTL = 2
REFRESH_BEFORE = 4


async def test_invoke_after_a_thaw_refreshes_before_the_next_event() -> None:
    async with (
        sandbox(
            lifetime_seconds=LIFETIME, refresh_before=str(REFRESH_BEFORE), min_serve_ttl=str(MIN_SERVE_TTL)
        ) as box,
        extension(box) as proc,
    ):
        first = await box.runtime.wait_for_poll(1)
        os.killpg(proc.pid, signal.SIGSTOP)  # frozen while waiting for its first event
        assert first.probe == (1, 1)
        minted_token = next(iter(box.google.iam.issued_access))
        # The token was minted before the poll, so it expires before first.at + LIFETIME:
        # from first.at + LIFETIME - MIN_SERVE_TTL on, it must not be served.
        thaw_at = first.at + LIFETIME - MIN_SERVE_TTL + 1
        await asyncio.sleep(max(thaw_at - time.time(), 0))
        assert box.counts() == (1, 1), "something ran while the extension was frozen"
        os.killpg(proc.pid, signal.SIGCONT)

        box.runtime.deliver_invoke()  # Lambda starts the function and notifies the extension at once
        function = asyncio.create_task(box.run_function())
        second = await box.runtime.wait_for_poll(2)
        served = (await function).json()

        assert second.probe == (2, 2), "the refresh did not complete before the next event/next"
        assert served["token"] != minted_token
        assert served["token"] in box.google.iam.issued_access
        assert served["seconds_left"] >= MIN_SERVE_TTL, served["seconds_left"]
        assert box.counts() == (2, 2), "the function's request and the refresh did not share one mint"

        box.runtime.deliver_shutdown()
        status, output = await exit_status(proc)
        assert status == 0, output
        assert box.runtime.violations == []


async def test_a_request_right_after_a_thaw_never_gets_a_short_lived_token() -> None:
    """The function may ask before the extension has even read the INVOKE: every cache
    hit is judged by the wall clock, so the stale token is not served; the request
    waits for a fresh one instead."""
    async with (
        sandbox(
            lifetime_seconds=LIFETIME, refresh_before=str(REFRESH_BEFORE), min_serve_ttl=str(MIN_SERVE_TTL)
        ) as box,
        extension(box) as proc,
    ):
        first = await box.runtime.wait_for_poll(1)
        os.killpg(proc.pid, signal.SIGSTOP)
        minted_token = next(iter(box.google.iam.issued_access))
        await asyncio.sleep(max(first.at + LIFETIME - MIN_SERVE_TTL + 1 - time.time(), 0))
        os.killpg(proc.pid, signal.SIGCONT)
        url = f"http://{box.metadata_host}{TOKEN_PATH}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                url, headers={"Metadata-Flavor": "Google"}, timeout=aiohttp.ClientTimeout(10)
            ) as response,
        ):
            body = await response.json()
        assert response.status == 200, body
        assert body["access_token"] != minted_token
        assert body["expires_in"] >= MIN_SERVE_TTL, body["expires_in"]
        box.runtime.deliver_shutdown()
        status, output = await exit_status(proc)
        assert status == 0, output
        assert box.runtime.violations == []

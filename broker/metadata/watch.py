"""``?wait_for_change=true``: long-poll semantics over static values.

The served values never change while the broker runs, so a watcher whose
``last_etag`` is current waits for ``timeout_sec`` and gets the same value back;
any other ``last_etag`` returns at once (metadata-protocol.md §3.3). Waiters
are released early when the daemon drains, so SIGTERM is never held up.

At most ``MAX_WAITERS`` (256) wait at once per server (SPEC §8): each holds a
connection for up to ten minutes, so beyond that the answer is 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Final

from aiohttp import web

from broker.metadata.tree import BadQuery, Rendered

MAX_TIMEOUT = 600
MAX_WAITERS = 256


class TooManyWaiters(Exception):
    """The long-poll cap is reached: the handler answers 503."""


class Waiters:
    """How many long-polls wait now, for one metadata app (state, not a value)."""

    def __init__(self, limit: int = MAX_WAITERS) -> None:
        self.limit = limit
        self.active = 0


WAITERS: Final = web.AppKey("watch_waiters", Waiters)


async def wait(
    rendered: Rendered, query: Mapping[str, str], shutdown: asyncio.Event, waiters: Waiters
) -> None:
    raw = query.get("timeout_sec", str(MAX_TIMEOUT))
    # 1-6 ASCII digits: str.isdigit() alone accepts "²" (int() then raises) and
    # 5,000 digits (over int's max_str_digits); both were 500s.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6):
        raise BadQuery("timeout_sec must be a whole number of seconds (1 to 6 digits)")
    if query.get("last_etag", "NONE") != rendered.etag:
        return
    if waiters.active >= waiters.limit:
        raise TooManyWaiters
    waiters.active += 1
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shutdown.wait(), timeout=min(int(raw), MAX_TIMEOUT))
    finally:
        waiters.active -= 1

"""Every typed ``web.AppKey``, in one place so handlers never import factories."""

from __future__ import annotations

import asyncio

from aiohttp import web

from broker.chain import TokenChain
from broker.clock import Clock
from broker.metadata.tree import Dir
from broker.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
CHAIN = web.AppKey("chain", TokenChain)
CLOCK = web.AppKey("clock", Clock)
TREE = web.AppKey("tree", Dir)
# Set when the daemon starts draining: wakes wait_for_change long-polls.
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)

"""The metadata app factory: routes and middlewares in one table."""

from __future__ import annotations

import asyncio

from aiohttp import web

from broker.appkeys import CHAIN, CLOCK, SETTINGS, SHUTDOWN, TREE
from broker.chain import TokenChain
from broker.clock import Clock
from broker.metadata import handlers, middleware, tree
from broker.settings import Settings

# Requests are a path, a query and a few headers; nothing legitimate is larger.
MAX_BODY = 4096


def create_metadata_app(
    settings: Settings, chain: TokenChain, clock: Clock, shutdown: asyncio.Event | None = None
) -> web.Application:
    app = web.Application(middlewares=[middleware.gce], client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[CHAIN] = chain
    app[CLOCK] = clock
    app[TREE] = tree.build_tree(settings)
    app[SHUTDOWN] = shutdown or asyncio.Event()
    app.router.add_get("/", handlers.root)
    app.router.add_get("/computeMetadata", handlers.compute_metadata)
    app.router.add_get("/computeMetadata/", handlers.compute_metadata)
    app.router.add_get("/computeMetadata/v1{tail:(/.*)?}", handlers.metadata)
    app.router.add_route("*", "/{tail:.*}", handlers.not_found)
    return app

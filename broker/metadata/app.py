"""The metadata app factory: one route table, every handler behind the GCE wire rules."""

from __future__ import annotations

import asyncio

from aiohttp import web

from broker.appkeys import CHAIN, CLOCK, SETTINGS, SHUTDOWN, TREE
from broker.chain import TokenChain
from broker.clock import Clock
from broker.metadata import handlers, passthrough, tree, watch
from broker.metadata.wire import HostAllowlist, gce_wire
from broker.metrics import Endpoint
from broker.settings import Settings

# Requests are a path, a query and a few headers; nothing legitimate is larger.
MAX_BODY = 4096
SA = "/computeMetadata/v1/instance/service-accounts"


def create_metadata_app(
    settings: Settings, chain: TokenChain, clock: Clock, shutdown: asyncio.Event | None = None
) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[SETTINGS] = settings
    app[CHAIN] = chain
    app[CLOCK] = clock
    app[TREE] = tree.build_tree(settings)
    app[SHUTDOWN] = shutdown or asyncio.Event()
    app[watch.WAITERS] = watch.Waiters()
    token = handlers.token_endpoint(app)
    hosts = HostAllowlist(address.host for address in settings.listen)
    routes = [
        ("/", handlers.root, Endpoint.ROOT),
        ("/computeMetadata", handlers.compute_metadata, Endpoint.LISTING),
        ("/computeMetadata/", handlers.compute_metadata, Endpoint.LISTING),
        # The token paths as plain routes: looked up by dict, not by regex (hot path).
        (f"{SA}/default/token", token, Endpoint.TOKEN),
        (f"{SA}/{settings.email}/token", token, Endpoint.TOKEN),
        ("/computeMetadata/v1{tail:(/.*)?}", handlers.metadata, Endpoint.OTHER),
        ("/computeMetadata/{tail:.*}", handlers.not_found, Endpoint.OTHER),
    ]
    for path, handler, endpoint in routes:
        # Only the tree handler tells listings, values, tokens and identity apart itself.
        per_request = handler is handlers.metadata
        app.router.add_route(
            "*", path, gce_wire(handler, endpoint, endpoint_per_request=per_request, hosts=hosts)
        )
    # The catch-all guarantees every request meets the wire rules. Outside
    # /computeMetadata/ only the guard applies (Host, browser and proxy headers):
    # the rest is not found (any method), or the host cloud's, relayed to its
    # IMDS (transparent mode).
    if settings.imds_passthrough:
        passthrough.install(app, settings.imds_passthrough)
        outside = gce_wire(passthrough.forward, Endpoint.PASSTHROUGH, gce_rules=False, hosts=hosts)
    else:
        outside = gce_wire(handlers.not_found, Endpoint.OTHER, gce_rules=False, hosts=hosts)
    app.router.add_route("*", "/{tail:.*}", outside)
    return app

"""The admin listener: liveness, readiness, metrics. It serves no token, ever."""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from broker import logs, metrics
from broker.appkeys import CHAIN
from broker.chain import TokenChain


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    ready, reason = request.app[CHAIN].readiness()
    body = {"status": "ready" if ready else "not_ready", "reason": logs.redact(reason)}
    return web.Response(
        status=200 if ready else 503, body=json.dumps(body).encode(), content_type="application/json"
    )


def create_admin_app(chain: TokenChain) -> web.Application:
    app = web.Application(client_max_size=4096)
    app[CHAIN] = chain
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(registry=metrics.REGISTRY, disable_compression=True))
    return app

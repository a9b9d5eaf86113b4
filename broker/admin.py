"""The admin listener: liveness, readiness, metrics. It serves no token, ever.

Loopback by default (SPEC §8): what reaches it may be anyone on the pod network
when a manifest opens it for the kubelet, so it says as little as it can: no
``Server`` naming Python and aiohttp, and a ``/readyz`` failure names the step
and the error class only. The service-account email, project number and pool
that the full error carries are in the broker's log (the chain logs every
upstream failure with its fix), not in a body.
"""

from __future__ import annotations

import json
import re

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from broker import metrics
from broker.appkeys import CHAIN
from broker.chain import TokenChain
from broker.errors import BrokerError

_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


SERVER = "wif-broker"  # aiohttp would send "Python/3.x aiohttp/3.y"


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    chain = request.app[CHAIN]
    ready, reason = chain.readiness()
    if not ready:
        error = chain.default_token_error()
        reason = _failure_class(error) if error else "default token not minted yet"
    body = {"status": "ready" if ready else "not_ready", "reason": reason}
    return web.Response(
        status=200 if ready else 503, body=json.dumps(body).encode(), content_type="application/json"
    )


def _failure_class(error: BrokerError) -> str:
    """``sts failed (Transient, HTTP 429)``: the step and the kind of failure, no detail.

    The upstream status and its machine-readable code (e.g. ``invalid_target``,
    checked to be one word) classify the failure; its text and the fix do not go out.
    """
    kind = [type(error).__name__]
    if error.upstream_status is not None:
        kind.append(f"HTTP {error.upstream_status}")
    if _CODE.fullmatch(error.code):
        kind.append(error.code)
    return f"{error.step.value} failed ({', '.join(kind)})"


def create_admin_app(chain: TokenChain) -> web.Application:
    app = web.Application(client_max_size=4096)
    app[CHAIN] = chain
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(registry=metrics.REGISTRY, disable_compression=True))
    app.on_response_prepare.append(_neutral_server)
    return app


async def _neutral_server(request: web.Request, response: web.StreamResponse) -> None:
    # Set before aiohttp's setdefault(Server, SERVER_SOFTWARE), so it wins.
    response.headers["Server"] = SERVER

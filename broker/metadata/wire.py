"""The GCE wire rules that apply to every request and response, and the one error mapping.

* ``Metadata-Flavor: Google`` and ``Server: Metadata Server for VM`` on every
  response, errors and redirects included: Node's gcp-metadata rejects any
  response without the flavor header (gcp-metadata#215).
* ``X-Forwarded-For`` → 403 anywhere: a proxy hop means the request may not come
  from this pod (Google's k8s-metadata-proxy does the same).
* ``Metadata-Flavor: Google`` required under ``/computeMetadata/`` → else 403; the
  root ``/`` answers without it, for Go's detection probe.
* Outside ``/computeMetadata/`` (the catch-all: 404, or the IMDS pass-through of
  transparent mode, ``passthrough.py``) only the ``X-Forwarded-For`` rule applies:
  any method, no flavor check. Unknown paths are 404 whatever the method.
* :class:`BrokerError` → 503 (transient) or 403/404 (denied), body redacted;
  :class:`RateLimited` → 429 with ``Retry-After`` in whole seconds.

This is a handler wrapper rather than an aiohttp middleware: the route table
ends in a catch-all, so every request reaches a wrapped handler anyway, and
aiohttp's middleware chain cost ~5 us per request on the token path (bench/).
Headers go into each response as it is built, for the same reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from multidict import CIMultiDict

from broker import logs, metrics
from broker.errors import BrokerError, RateLimited, Transient
from broker.metadata.tree import JSON, TEXT

log = logging.getLogger("broker.metadata")
SERVER: Final = "Metadata Server for VM"
ENDPOINT_KEY: Final = web.RequestKey("endpoint", metrics.Endpoint)  # set by handlers, read for metrics
HTML = "text/html; charset=UTF-8"
PLAIN = "text/plain; charset=utf-8"
_GCE = {"Metadata-Flavor": "Google", "Server": SERVER}
# Prebuilt per content type: aiohttp copies a CIMultiDict in C, faster than
# building headers per response.
_HEADERS = {ct: CIMultiDict({"Content-Type": ct, **_GCE}) for ct in (TEXT, JSON, HTML, PLAIN)}
__all__ = ["HTML", "JSON", "PLAIN", "TEXT", "Handler", "error_response", "gce_wire", "respond"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def respond(body: bytes, content_type: str, *, status: int = 200, etag: str | None = None) -> web.Response:
    response = web.Response(status=status, body=body, headers=_HEADERS[content_type])
    if etag is not None:
        response.headers["ETag"] = etag
    return response


def error_response(status: int, text: str, *, html: bool = True) -> web.Response:
    # GCE sends errors as text/html; ours are plain sentences that may quote
    # upstream text, so anything not fixed by us goes out as text/plain.
    return respond((text + "\n").encode(), HTML if html else PLAIN, status=status)


def gce_wire(
    handler: Handler,
    endpoint: metrics.Endpoint = metrics.Endpoint.OTHER,
    *,
    gce_rules: bool = True,
    endpoint_per_request: bool = False,
) -> Handler:
    """Apply the wire rules around ``handler``; ``endpoint`` labels its metrics, unless
    ``endpoint_per_request``: then the handler may name it (``request[ENDPOINT_KEY]``).
    ``gce_rules=False`` (paths outside /computeMetadata/): the X-Forwarded-For rule only."""
    # Resolved once: on the token path a dict lookup that misses (Mapping.get raises
    # and catches KeyError) and a label lookup per request were measurable (bench/).
    cells = metrics.request_cells(endpoint)

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = _refusal(request, gce_rules) or await handler(request)
        except web.HTTPException as exc:
            response = error_response(exc.status, exc.reason)
        except BrokerError as exc:
            response = error_response(_status_of(exc), logs.redact(exc.describe()), html=False)
            if isinstance(exc, Transient):
                response.headers["Retry-After"] = "1"
            elif isinstance(exc, RateLimited):
                response.headers["Retry-After"] = str(max(1, int(exc.retry_after or 1)))
        except Exception:
            log.exception("unhandled error in metadata handler", extra={"event": "internal_error"})
            response = error_response(500, "Internal error")
        if endpoint_per_request:
            metrics.count_request(request.get(ENDPOINT_KEY, endpoint), response.status)
        else:
            cells[min(response.status // 100, 5)].value += 1
        return response

    return wrapped


def _refusal(request: web.Request, gce_rules: bool = True) -> web.Response | None:
    headers = request.headers
    if "X-Forwarded-For" in headers:
        return error_response(403, "Forbidden: requests carrying X-Forwarded-For are refused")
    if not gce_rules:
        return None
    path = request.path
    under = path.startswith("/computeMetadata/") or path == "/computeMetadata"
    if under and headers.get("Metadata-Flavor") != "Google":
        return error_response(403, 'Missing required header "Metadata-Flavor": "Google"')
    if request.method not in ("GET", "HEAD"):
        response = error_response(405, "Method Not Allowed")
        response.headers["Allow"] = "GET, HEAD"  # RFC 9110 §15.5.6: a 405 must say what is allowed
        return response
    return None


def _status_of(exc: BrokerError) -> int:
    if isinstance(exc, RateLimited):
        return 429
    if isinstance(exc, Transient):
        return 503
    return 404 if exc.upstream_status == 404 else 403

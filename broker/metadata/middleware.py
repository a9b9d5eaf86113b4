"""The GCE wire rules that apply to every response, and the one error mapping.

* ``Metadata-Flavor: Google`` and ``Server: Metadata Server for VM`` on every
  response, errors and redirects included: Node's gcp-metadata rejects any
  response without the flavor header (gcp-metadata#215).
* ``X-Forwarded-For`` → 403 anywhere: a proxy hop means the request may not come
  from this pod (Google's k8s-metadata-proxy does the same).
* ``Metadata-Flavor: Google`` required under ``/computeMetadata/`` → else 403; the
  root ``/`` answers without it, for Go's detection probe.
* :class:`BrokerError` → 503 (transient) or 403/404 (denied), body redacted.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from broker import logs, metrics
from broker.errors import BrokerError, Transient

log = logging.getLogger("broker.metadata")
SERVER: Final = "Metadata Server for VM"
ENDPOINT_KEY: Final = web.RequestKey("endpoint", metrics.Endpoint)  # set by handlers, read for metrics
HTML = "text/html"


def error_response(status: int, text: str, *, html: bool = True) -> web.Response:
    # GCE sends errors as text/html; ours are plain sentences that may quote
    # upstream text, so anything not fixed by us goes out as text/plain.
    return web.Response(
        status=status,
        body=(text + "\n").encode(),
        content_type=HTML if html else "text/plain",
        charset="UTF-8" if html else "utf-8",
    )


@web.middleware
async def gce(request: web.Request, handler: Handler) -> web.StreamResponse:
    # One middleware, not two: it sits on every request's hot path (bench/).
    try:
        response = _refusal(request) or await handler(request)
    except web.HTTPException as exc:
        response = error_response(exc.status, exc.reason)
    except BrokerError as exc:
        response = error_response(_status_of(exc), logs.redact(exc.describe()), html=False)
        if isinstance(exc, Transient):
            response.headers["Retry-After"] = "1"
    except Exception:
        log.exception("unhandled error in metadata handler", extra={"event": "internal_error"})
        response = error_response(500, "Internal error")
    headers = response.headers
    headers["Metadata-Flavor"] = "Google"
    headers["Server"] = SERVER
    metrics.count_request(request.get(ENDPOINT_KEY, metrics.Endpoint.OTHER), response.status)
    return response


def _refusal(request: web.Request) -> web.Response | None:
    headers = request.headers
    if "X-Forwarded-For" in headers:
        return error_response(403, "Forbidden: requests carrying X-Forwarded-For are refused")
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
    if isinstance(exc, Transient):
        return 503
    return 404 if exc.upstream_status == 404 else 403

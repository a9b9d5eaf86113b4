"""The GCE wire rules that apply to every request and response, and the one error mapping.

* ``Metadata-Flavor: Google`` and ``Server: Metadata Server for VM`` on every
  response, errors and redirects included: Node's gcp-metadata rejects any
  response without the flavor header (gcp-metadata#215).
* The guard (:func:`_refusal`, the one place that decides what a request may do;
  SPEC §8 "local attack surface"), on every path, pass-through included:

  - ``Host`` must name this server: a listen address, ``localhost``,
    ``127.0.0.1``, ``[::1]``, ``metadata.google.internal``, ``metadata`` or
    ``169.254.169.254``, any port, any case, one trailing dot allowed (the FQDN
    spelling of the same name), or the address the connection arrived on
    (a wildcard listen address). Else 403: a browser page on a name the
    attacker rebinds to 127.0.0.1 sends that name as ``Host``. HTTP/1.1
    without ``Host`` (or with two) → 400 (RFC 9112 §3.2); HTTP/1.0 without
    ``Host`` is served: browsers always send ``Host``, so a request without
    one cannot be a rebinding page, and old tools speak HTTP/1.0.
  - ``Origin``, ``Sec-Fetch-Site``, ``Sec-Fetch-Mode`` (a browser made the
    request) and ``X-Forwarded-For``, ``X-Forwarded-Host``, ``X-Real-IP``,
    ``Forwarded``, ``Via`` (a proxy hop: the request may not come from this
    pod; Google's k8s-metadata-proxy refuses X-Forwarded-For too) → 403.
    One exception: outside ``/computeMetadata/`` a ``Via`` naming only
    ``wif-broker`` goes on to the handler, so the pass-through's loop guard
    answers 508 and says how to fix the redirect (passthrough.py).
  - A repeated ``Metadata-Flavor`` → 403: which copy wins is not for a proxy
    or a smuggler to choose.
* ``Metadata-Flavor: Google`` required under ``/computeMetadata/`` → else 403; the
  root ``/`` answers without it, for Go's detection probe.
* Outside ``/computeMetadata/`` (the catch-all: 404, or the IMDS pass-through of
  transparent mode, ``passthrough.py``) only the guard applies: any method, no
  flavor check. Unknown paths are 404 whatever the method.
* :class:`BrokerError` → 503 (transient) or 403/404 (denied), body redacted.

This is a handler wrapper rather than an aiohttp middleware: the route table
ends in a catch-all, so every request reaches a wrapped handler anyway, and
aiohttp's middleware chain cost ~5 us per request on the token path (bench/).
Headers go into each response as it is built, for the same reason.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from aiohttp import web
from multidict import CIMultiDict

from broker import logs, metrics
from broker.errors import BrokerError, Transient
from broker.metadata.tree import JSON, TEXT

log = logging.getLogger("broker.metadata")
SERVER: Final = "Metadata Server for VM"
ENDPOINT_KEY: Final = web.RequestKey("endpoint", metrics.Endpoint)  # set by handlers, read for metrics
HTML = "text/html; charset=UTF-8"
PLAIN = "text/plain; charset=utf-8"
GCE_HEADERS: Final = {"Metadata-Flavor": "Google", "Server": SERVER}
# Prebuilt per content type: aiohttp copies a CIMultiDict in C, faster than
# building headers per response.
_HEADERS = {ct: CIMultiDict({"Content-Type": ct, **GCE_HEADERS}) for ct in (TEXT, JSON, HTML, PLAIN)}
__all__ = [
    "HTML",
    "JSON",
    "PLAIN",
    "TEXT",
    "Handler",
    "allowed_hosts",
    "error_response",
    "gce_wire",
    "respond",
]
# Names a client of this server may put in Host (lower case, no port, no brackets).
FIXED_HOSTS: Final = frozenset(
    {"localhost", "127.0.0.1", "::1", "metadata.google.internal", "metadata", "169.254.169.254"}
)
# Request headers that mean a browser or a proxy made the request (lower-case bytes,
# compared with the raw header names: one pass over the head, no MultiDict lookups).
_REFUSED: Final = frozenset(
    {
        b"origin",
        b"sec-fetch-site",
        b"sec-fetch-mode",
        b"forwarded",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-real-ip",
    }
)
_SELF_VIA: Final = b"wif-broker"  # passthrough.VIA's product token

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
    hosts: frozenset[str] = FIXED_HOSTS,
) -> Handler:
    """Apply the wire rules around ``handler``; ``endpoint`` labels its metrics, unless
    ``endpoint_per_request``: then the handler may name it (``request[ENDPOINT_KEY]``).
    ``gce_rules=False`` (paths outside /computeMetadata/): the guard only. ``hosts``:
    the ``Host`` names accepted (:func:`allowed_hosts`)."""
    # Resolved once: on the token path a dict lookup that misses (Mapping.get raises
    # and catches KeyError) and a label lookup per request were measurable (bench/).
    cells = metrics.request_cells(endpoint)

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = _refusal(request, hosts, gce_rules) or await handler(request)
        except web.HTTPException as exc:
            response = error_response(exc.status, exc.reason)
        except BrokerError as exc:
            response = error_response(_status_of(exc), logs.redact(exc.describe()), html=False)
            if isinstance(exc, Transient):
                response.headers["Retry-After"] = "1"
        except Exception:
            log.exception("unhandled error in metadata handler", extra={"event": "internal_error"})
            response = error_response(500, "Internal error")
        if endpoint_per_request:
            metrics.count_request(request.get(ENDPOINT_KEY, endpoint), response.status)
        else:
            cells[min(response.status // 100, 5)].value += 1
        return response

    return wrapped


def allowed_hosts(listen: Iterable[str]) -> frozenset[str]:
    """The ``Host`` names accepted: the fixed ones plus the listen addresses' hosts."""
    return FIXED_HOSTS | {host.lower().rstrip(".") for host in listen}


def _refusal(request: web.Request, hosts: frozenset[str], gce_rules: bool = True) -> web.Response | None:
    host: bytes | None = None
    host_count = flavor_count = 0
    refused = b""
    for name, value in request.raw_headers:
        lower = name.lower()
        if lower == b"host":
            host, host_count = value, host_count + 1
        elif lower == b"metadata-flavor":
            flavor_count += 1
        elif lower in _REFUSED and not refused:
            if lower == b"via" and not gce_rules and value.strip().endswith(_SELF_VIA):
                continue  # the pass-through's own relay came back: its loop guard answers
            refused = name
    if refused:
        return error_response(403, f"Forbidden: requests carrying {refused.decode('latin-1')} are refused")
    if host_count != 1:
        if host_count == 0 and request.version < (1, 1):
            pass  # see the module docstring: no browser sends a request without Host
        else:
            return error_response(400, "Bad Request: exactly one Host header is required")
    elif not _host_ok(host or b"", hosts, request):
        # The Host is not echoed: it is whatever name an attacker's page used.
        return error_response(403, "Forbidden: the Host header does not name this metadata server")
    if not gce_rules:
        return None
    path = request.path
    under = path.startswith("/computeMetadata/") or path == "/computeMetadata"
    if flavor_count > 1:
        return error_response(403, 'Forbidden: "Metadata-Flavor" must be sent once')
    if under and request.headers.get("Metadata-Flavor") != "Google":
        return error_response(403, 'Missing required header "Metadata-Flavor": "Google"')
    if request.method not in ("GET", "HEAD"):
        response = error_response(405, "Method Not Allowed")
        response.headers["Allow"] = "GET, HEAD"  # RFC 9110 §15.5.6: a 405 must say what is allowed
        return response
    return None


def _host_ok(raw: bytes, hosts: frozenset[str], request: web.Request) -> bool:
    name = _host_name(raw.decode("latin-1").strip().lower())
    if name in hosts:
        return True
    # A wildcard listen address (0.0.0.0, ::): the client may name the address it
    # connected to (e.g. the pod IP from a kubelet-like caller). An IP literal
    # cannot be rebound: the browser connected to exactly that address.
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname or name is None:
        return False
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(sockname[0])
    except ValueError:
        return False


def _host_name(host: str) -> str | None:
    """``host[:port]`` or ``[v6][:port]`` → the name, without a trailing dot; None if malformed."""
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return host[1:end]
    name, sep, port = host.rpartition(":")
    if not sep:
        name = port
    elif not (port.isascii() and port.isdigit()) and port != "":
        return None
    return name[:-1] if name.endswith(".") else name


def _status_of(exc: BrokerError) -> int:
    if isinstance(exc, Transient):
        return 503
    return 404 if exc.upstream_status == 404 else 403

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
    without ``Host`` (or with two) → 400 (RFC 9112 §3.2; aiohttp's parser
    already refuses it, with our headers: listener.py); HTTP/1.0 without
    ``Host`` is served: browsers always send ``Host``, so a request without
    one cannot be a rebinding page, and old tools speak HTTP/1.0.
  - ``Origin``, ``Sec-Fetch-Site``, ``Sec-Fetch-Mode`` (a browser made the
    request) and ``X-Forwarded-For``, ``X-Forwarded-Host``, ``X-Real-IP``,
    ``Forwarded``, ``Via`` (a proxy hop: the request may not come from this
    pod; Google's k8s-metadata-proxy refuses X-Forwarded-For too) → 403.
    One exception: outside ``/computeMetadata/`` a ``Via`` whose last hop is
    ``wif-broker`` goes on to the handler, so the pass-through's loop guard
    answers 508 and says how to fix the redirect (passthrough.py).
  - On the GCE paths (``/`` and ``/computeMetadata/…``) a repeated
    ``Metadata-Flavor`` → 403: which copy wins is not for a proxy or a
    smuggler to choose.
* ``Metadata-Flavor: Google`` required under ``/computeMetadata/`` → else 403; the
  root ``/`` answers without it, for Go's detection probe.
* Outside ``/computeMetadata/`` (the catch-all: 404, or the IMDS pass-through of
  transparent mode, ``passthrough.py``) only the guard applies: any method, no
  flavor check. Unknown paths are 404 whatever the method.
* :class:`BrokerError` → 503 (transient) or 403/404 (denied), body redacted;
  :class:`RateLimited` → 429 with ``Retry-After`` in whole seconds, answered after
  the listener's pause (``listener.pace_refusal``).

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
from multidict import CIMultiDict, istr

from broker import logs, metrics
from broker.errors import BrokerError, NotFound, RateLimited, Transient
from broker.metadata.listener import pace_refusal
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
    "HostAllowlist",
    "error_response",
    "gce_wire",
    "respond",
]
# Names a client of this server may put in Host (lower case, no port, no brackets).
FIXED_HOSTS: Final = frozenset(
    {"localhost", "127.0.0.1", "::1", "metadata.google.internal", "metadata", "169.254.169.254"}
)
# Request headers that mean a browser or a proxy made the request.
_VIA: Final = istr("Via")
_REFUSED: Final = (
    *(istr(name) for name in ("X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP", "Forwarded", "Origin")),
    *(istr(name) for name in ("Sec-Fetch-Site", "Sec-Fetch-Mode")),
    _VIA,
)
_HOST: Final = istr("Host")
_FLAVOR: Final = istr("Metadata-Flavor")
_MEMO: Final = 64
_SELF_VIA: Final = "wif-broker"  # passthrough.VIA's product token

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
    hosts: HostAllowlist | None = None,
) -> Handler:
    """Apply the wire rules around ``handler``; ``endpoint`` labels its metrics, unless
    ``endpoint_per_request``: then the handler may name it (``request[ENDPOINT_KEY]``).
    ``gce_rules=False`` (paths outside /computeMetadata/): the guard only. ``hosts``:
    the ``Host`` values accepted (one :class:`HostAllowlist` per app)."""
    # Resolved once: on the token path a dict lookup that misses (Mapping.get raises
    # and catches KeyError) and a label lookup per request were measurable (bench/).
    cells = metrics.request_cells(endpoint)
    allowlist = hosts or HostAllowlist()

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = _refusal(request, allowlist, gce_rules) or await handler(request)
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
        if response.status == 429:
            await pace_refusal(request)  # a closed-loop flood of refusals is slowed down (listener.py)
        return response

    return wrapped


class HostAllowlist:
    """The ``Host`` values a metadata app accepts (SPEC §8), with a small memo.

    Accepted values seen before are answered by one dict lookup (the token path
    sends the same ``Host`` every time); refused ones are not remembered, so a
    caller cannot grow the memo, which also stops at ``_MEMO`` entries.
    """

    __slots__ = ("_memo", "names")

    def __init__(self, listen: Iterable[str] = ()) -> None:
        self.names = FIXED_HOSTS | {host.lower().rstrip(".") for host in listen}
        self._memo: dict[str, bool] = {}

    def allows(self, value: str, request: web.Request) -> bool:
        if value in self._memo:
            return True
        name = _host_name(value.strip().lower())
        if name in self.names:
            if len(self._memo) < _MEMO:
                self._memo[value] = True
            return True
        # A wildcard listen address (0.0.0.0, ::): the client may name the address
        # it connected to. An IP literal cannot be rebound: the client connected to
        # exactly that address. Per connection, so never memoised.
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not sockname or name is None:
            return False
        try:
            return ipaddress.ip_address(name) == ipaddress.ip_address(sockname[0])
        except ValueError:
            return False


def _refusal(request: web.Request, hosts: HostAllowlist, gce_rules: bool = True) -> web.Response | None:
    # MultiDict lookups in C: a Python loop over the raw head cost ~2 us more per
    # request (timeit of this function: +0.2-0.5 us over the old guard now).
    headers = request.headers
    for name in _REFUSED:
        if name in headers:
            if (
                name is _VIA
                and not gce_rules
                and all(v.strip().endswith(_SELF_VIA) for v in headers.getall(_VIA))
            ):
                continue  # the pass-through's own relay came back: its loop guard answers 508
            return error_response(403, f"Forbidden: requests carrying {name} are refused")
    host = headers.getall(_HOST, ())
    if len(host) != 1:
        # HTTP/1.0 without Host is served: no browser sends a request without Host.
        # (aiohttp's parser already answers 400 to HTTP/1.1 without, or with two.)
        if host or request.version >= (1, 1):
            return error_response(400, "Bad Request: exactly one Host header is required")
    elif not hosts.allows(host[0], request):
        # The Host is not echoed: it is whatever name an attacker's page used.
        return error_response(403, "Forbidden: the Host header does not name this metadata server")
    if not gce_rules:
        return None
    flavor = headers.getall(_FLAVOR, ())
    if len(flavor) > 1:
        return error_response(403, 'Forbidden: "Metadata-Flavor" must be sent once')
    path = request.path
    under = path.startswith("/computeMetadata/") or path == "/computeMetadata"
    if under and (not flavor or flavor[0] != "Google"):
        return error_response(403, 'Missing required header "Metadata-Flavor": "Google"')
    if request.method not in ("GET", "HEAD"):
        response = error_response(405, "Method Not Allowed")
        response.headers["Allow"] = "GET, HEAD"  # RFC 9110 §15.5.6: a 405 must say what is allowed
        return response
    return None


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
    if isinstance(exc, RateLimited):
        return 429
    if isinstance(exc, Transient):
        return 503
    return 404 if isinstance(exc, NotFound) else 403

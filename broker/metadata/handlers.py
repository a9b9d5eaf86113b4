"""Thin handlers: parse the request, call the tree or the chain once, render."""

from __future__ import annotations

import functools
import json

from aiohttp import web

from broker import metrics
from broker.appkeys import CHAIN, CLOCK, SETTINGS, SHUTDOWN, TREE
from broker.errors import BrokerError, RateLimited
from broker.metadata import tree, watch
from broker.metadata.wire import ENDPOINT_KEY, JSON, TEXT, Handler, error_response, respond
from broker.tokens import IdTokenKey, ScopeSet

PREFIX = "/computeMetadata/v1/"
# gcloud asks for this audience on every credential refresh and aborts on 403
# or 5xx, but ignores 404 (metadata-protocol.md §1.7).
GCLOUD_AUDIENCE = "32555940559.apps.googleusercontent.com"
_TOKEN_JSON = b'{"access_token":%s,"expires_in":%d,"token_type":"Bearer"}'
MAX_AUDIENCE_BYTES = 1024  # SPEC §8; an audience is a URL or a client ID, never near this
# C0 controls (tab included) and DEL: no legitimate audience has them, and they would
# end up in a JWT claim, a cache key and possibly a log line.
_CONTROLS = frozenset(map(chr, [*range(0x20), 0x7F]))


async def root(request: web.Request) -> web.Response:
    return _text("computeMetadata/\n")


async def compute_metadata(request: web.Request) -> web.Response:
    if request.path == "/computeMetadata":
        return _redirect(request)
    return _text("v1/\n")


async def metadata(request: web.Request) -> web.StreamResponse:
    path = request.path
    if path == PREFIX.rstrip("/"):
        request[ENDPOINT_KEY] = metrics.Endpoint.LISTING
        return _redirect(request)
    rest = path[len(PREFIX) :]
    trailing = rest.endswith("/") or rest == ""
    segments = [s for s in rest.split("/") if s]  # tolerate "//", as GCE's emulator test does
    settings = request.app[SETTINGS]
    if segments[:2] == ["instance", "service-accounts"] and len(segments) >= 3:
        if segments[2] not in ("default", settings.email):
            return error_response(404, "Not Found: unknown service account")
        if len(segments) == 4 and segments[3] in ("token", "identity"):
            if trailing:
                return error_response(404, "Not Found")
            if segments[3] == "token":  # e.g. a "//" in the path missed the plain token route
                request[ENDPOINT_KEY] = metrics.Endpoint.TOKEN
                return await token(request)
            return await identity(request)
    node = tree.resolve(request.app[TREE], segments)
    if node is None:
        request[ENDPOINT_KEY] = metrics.Endpoint.OTHER
        return error_response(404, "Not Found")
    is_dir = isinstance(node, tree.Dir)
    request[ENDPOINT_KEY] = metrics.Endpoint.LISTING if is_dir else metrics.Endpoint.VALUE
    if is_dir and not trailing:
        return _redirect(request)
    if not is_dir and trailing:
        return error_response(404, "Not Found")
    query = request.query
    recursive = query.get("recursive", "").lower() == "true"
    waiting = query.get("wait_for_change", "").lower() == "true"
    try:
        if waiting and is_dir and not recursive:
            raise tree.BadQuery("wait_for_change on a directory needs recursive=true")
        rendered = tree.render(node, alt=query.get("alt"), recursive=recursive)
        if waiting:
            await watch.wait(rendered, query, request.app[SHUTDOWN], request.app[watch.WAITERS])
    except tree.BadQuery as exc:
        return error_response(400, f"Bad Request: {exc}")
    except watch.TooManyWaiters:
        response = error_response(503, "Service Unavailable: too many wait_for_change requests")
        response.headers["Retry-After"] = "1"
        return response
    return respond(rendered.body, rendered.content_type, etag=rendered.etag)


def token_endpoint(app: web.Application) -> Handler:
    """The token handler, bound once to the app's chain, clock and default scopes: the
    three ``request.app[...]`` lookups were a sixth of the broker's own time per request."""
    chain, clock, default = app[CHAIN], app[CLOCK], app[SETTINGS].scopes

    async def token(request: web.Request) -> web.Response:
        # Most clients send no query at all; don't build a MultiDict for nothing.
        raw_scopes = request.query.get("scopes") if request.query_string else None
        scopes = _scope_set(raw_scopes) if raw_scopes else default
        # A cache hit is answered without awaiting anything: the common case by far.
        access = chain.cached_access_token(scopes) or await chain.access_token(scopes)
        expires_in = int(access.expires_at - clock.wall())
        # expires_in counts down, so the body is rebuilt each time around the one
        # part that is costly to encode (the token, JSON-escaped once per token).
        return respond(_TOKEN_JSON % (_json_string(access.value), expires_in), JSON)

    return token


async def token(request: web.Request) -> web.StreamResponse:
    """The token answer for paths only the tree handler matches (e.g. with "//")."""
    return await token_endpoint(request.app)(request)


@functools.lru_cache(maxsize=256)
def _scope_set(raw: str) -> ScopeSet:
    return ScopeSet.parse(raw)


@functools.lru_cache(maxsize=256)
def _json_string(value: str) -> bytes:
    return json.dumps(value).encode()


async def identity(request: web.Request) -> web.Response:
    request[ENDPOINT_KEY] = metrics.Endpoint.IDENTITY
    audience = request.query.get("audience", "")
    if not audience:
        return error_response(400, "Bad Request: non-empty audience parameter required")
    if len(audience.encode("utf-8", "surrogatepass")) > MAX_AUDIENCE_BYTES:
        return error_response(400, f"Bad Request: audience longer than {MAX_AUDIENCE_BYTES} bytes")
    if not _CONTROLS.isdisjoint(audience):
        return error_response(400, "Bad Request: audience contains control characters")
    fmt = request.query.get("format", "standard")
    if fmt not in ("standard", "full"):
        return error_response(400, "Bad Request: format must be standard or full")
    key = IdTokenKey(audience=audience, include_email=fmt == "full")
    try:
        id_token = await request.app[CHAIN].id_token(key)
    except BrokerError as exc:
        if audience == GCLOUD_AUDIENCE and not isinstance(exc, RateLimited):
            return error_response(404, "Not Found: no ID token for gcloud's own audience")
        raise
    return respond(id_token.value.encode(), TEXT)


def _text(text: str) -> web.Response:
    return respond(text.encode(), TEXT, etag=tree.Rendered(text.encode(), TEXT).etag)


def _redirect(request: web.Request) -> web.Response:
    # Real GCE: 301 to the slash form, keeping the query (gax-dotnet#410); gsutil
    # and Node's isAvailable depend on it. A relative reference (RFC 9110 §10.2.2),
    # not GCE's absolute URL on the client's Host: a Location never echoes Host.
    # The raw (still percent-encoded) path: decoded, it could carry CR/LF or "//".
    raw = request.rel_url.raw_path
    query = f"?{request.rel_url.raw_query_string}" if request.rel_url.raw_query_string else ""
    response = error_response(301, f"{request.path}/")
    response.headers["Location"] = f"{raw}/{query}"
    return response


async def not_found(request: web.Request) -> web.Response:
    return error_response(404, "Not Found")

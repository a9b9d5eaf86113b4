"""IMDS pass-through for transparent mode: relay non-GCE paths to the host cloud's IMDS.

When the broker owns ``169.254.169.254:80`` inside a pod, the AWS and Azure
SDKs in that pod still expect their own instance metadata there (AWS
``/latest/…`` including the IMDSv2 ``PUT /latest/api/token``, Azure
``/metadata/…`` with ``Metadata: true``). With the ``imds-passthrough`` setting
every request outside ``/computeMetadata/`` (other than ``/``) is relayed to
that base URL:

* verbatim: method, raw path and query, and every end-to-end header
  (``X-aws-ec2-metadata-token*``, ``Metadata``, ``User-Agent``…); hop-by-hop
  headers (RFC 9110 §7.6.1) and ``Host`` are dropped; ``Via: 1.1 wif-broker``
  is added, and a request already carrying it is refused with 508, so a broker
  whose own connections are redirected back to itself (the iptables rule does
  not exempt its UID) fails at once instead of recursing;
* bounded: request bodies up to ``MAX_REQUEST_BODY`` (else 413), responses up
  to ``MAX_RESPONSE_BODY`` (else 502), the whole exchange within ``TIMEOUT``;
* relayed responses are the upstream's (status, headers minus hop-by-hop, raw
  body; no ``Metadata-Flavor`` added). Errors the broker composes itself follow
  the GCE wire rules like every other broker response: 502 when the upstream
  cannot be reached or misbehaves, 504 when it does not answer in time.

``X-Forwarded-For`` is still refused (403) by the wire rules: both IMDSs refuse
proxied requests, and so does the broker. Nothing here logs a header or body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from broker.metadata.wire import error_response

log = logging.getLogger("broker.metadata.passthrough")
UPSTREAM: Final = web.AppKey("passthrough_upstream", str)
SESSION: Final = web.AppKey("passthrough_session", aiohttp.ClientSession)
MAX_REQUEST_BODY: Final = 64 * 1024  # IMDS requests carry no body; the AWS token PUT is empty
MAX_RESPONSE_BODY: Final = 1 << 20  # EC2 user-data is at most 16 KiB; Azure's JSON documents are small
# AWS SDKs give IMDS 1 s per attempt; Azure's token endpoint may take a few seconds.
TIMEOUT: Final = aiohttp.ClientTimeout(total=10, sock_connect=3)
VIA: Final = "1.1 wif-broker"
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed (or set) by aiohttp for the new message; Expect is answered by our server.
_REQUEST_DROP: Final = _HOP_BY_HOP | {"host", "content-length", "expect"}
_RESPONSE_DROP: Final = _HOP_BY_HOP | {"content-length"}
# aiohttp adds these unless told not to; a verbatim relay sends only what the client sent.
_NO_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def install(app: web.Application, upstream: str) -> None:
    """Relay through ``upstream`` (``scheme://host[:port]``) with a session owned by ``app``."""
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(_session)


async def _session(app: web.Application) -> AsyncIterator[None]:
    # No cookie jar, no proxy from the environment, bytes relayed as received.
    log.info(
        "IMDS pass-through on: paths outside /computeMetadata/ are relayed",
        extra={"event": "passthrough", "upstream": app[UPSTREAM]},
    )
    app[SESSION] = aiohttp.ClientSession(
        timeout=TIMEOUT,
        trust_env=False,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_NO_AUTO_HEADERS,
        connector=aiohttp.TCPConnector(limit=64),
    )
    yield
    await app[SESSION].close()


async def forward(request: web.Request) -> web.StreamResponse:
    if request.method in ("CONNECT", "TRACE"):  # no IMDS uses them; TRACE would echo tokens back
        return error_response(405, f"Method Not Allowed: {request.method} is not relayed", html=False)
    if any("wif-broker" in value for value in request.headers.getall("Via", [])):
        log.warning(
            "IMDS pass-through loop: the broker's own relay came back to it",
            extra={"event": "passthrough_loop", "method": request.method, "path": request.path},
        )
        return error_response(
            508,
            "Loop Detected: this IMDS pass-through request came back to the broker; "
            "exempt the broker's UID from the 169.254.169.254 redirect",
            html=False,
        )
    body = await _bounded_body(request)
    if body is None:
        too_large = f"Payload Too Large: pass-through bodies are limited to {MAX_REQUEST_BODY} bytes"
        return error_response(413, too_large, html=False)
    upstream = request.app[UPSTREAM]
    # Only ever the configured upstream: the Host header and the host of an
    # absolute-form target are ignored, so the relay is no open proxy.
    url = URL(upstream + request.rel_url.raw_path_qs, encoded=True)
    try:
        async with request.app[SESSION].request(
            request.method,
            url,
            headers=_forwarded_headers(request),
            data=body or None,
            allow_redirects=False,
        ) as resp:
            data = await _bounded_read(resp)
            if data is None:
                return _failure(request, upstream, 502, f"its response exceeds {MAX_RESPONSE_BODY} bytes")
            drop = _response_drop(resp)
            headers = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in drop)
            return web.Response(status=resp.status, reason=resp.reason, headers=headers, body=data)
    except TimeoutError:
        return _failure(request, upstream, 504, f"no answer within {TIMEOUT.total:g} s")
    except aiohttp.ClientError as exc:
        return _failure(request, upstream, 502, f"cannot reach it ({type(exc).__name__})")


def _forwarded_headers(request: web.Request) -> CIMultiDict[str]:
    drop = _REQUEST_DROP | _connection_tokens(request.headers.getall("Connection", []))
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
    headers.add("Via", VIA)
    return headers


def _response_drop(resp: aiohttp.ClientResponse) -> frozenset[str]:
    return _RESPONSE_DROP | _connection_tokens(resp.headers.getall("Connection", []))


def _connection_tokens(values: list[str]) -> frozenset[str]:
    """Header names a ``Connection`` header lists are hop-by-hop too (RFC 9110 §7.6.1)."""
    return frozenset(token.strip().lower() for value in values for token in value.split(",") if token.strip())


async def _bounded_body(request: web.Request) -> bytes | None:
    if request.content_length is not None and request.content_length > MAX_REQUEST_BODY:
        return None
    return await _read_at_most(request.content, MAX_REQUEST_BODY)


async def _bounded_read(resp: aiohttp.ClientResponse) -> bytes | None:
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE_BODY:
        return None
    return await _read_at_most(resp.content, MAX_RESPONSE_BODY)


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _failure(request: web.Request, upstream: str, status: int, why: str) -> web.Response:
    host = URL(upstream).host
    log.warning(
        "IMDS pass-through failed",
        extra={
            "event": "passthrough_error",
            "upstream": host,
            "method": request.method,
            "path": request.path,  # never the query or a header: no token can leak
            "status": status,
        },
    )
    reason = "Bad Gateway" if status == 502 else "Gateway Timeout"
    return error_response(status, f"{reason}: IMDS pass-through to {host}: {why}", html=False)

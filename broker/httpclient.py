"""Outbound HTTP: one session factory, bounded reads, upstream error decoding.

Every call has a timeout and reads at most ``MAX_BODY`` bytes (golang/oauth2's
LimitReader habit), so a broken or hostile upstream cannot stall or bloat us.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from broker import __version__
from broker.errors import BrokerError, Denied, Step, Transient

MAX_BODY = 1 << 20
TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)
USER_AGENT = f"wif-broker/{__version__}"
# 429, 5xx and the Azure IMDS "updating" 404/410 are worth another try.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def new_session() -> aiohttp.ClientSession:
    # trust_env=False: an HTTP(S)_PROXY meant for the app must not capture
    # token traffic, and the broker never sends X-Forwarded-For itself.
    return aiohttp.ClientSession(
        timeout=TIMEOUT, headers={"User-Agent": USER_AGENT}, trust_env=False, raise_for_status=False
    )


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return loads(self.body)


def loads(body: bytes) -> Any:
    """``json.loads`` that fails only with ValueError, whatever an upstream sends.

    A body nested deeper than the interpreter's recursion limit (``[[[[…`` fits
    easily in ``MAX_BODY``) makes the stdlib decoder raise RecursionError, which
    callers parsing a reply do not expect: it would surface as a 500.
    """
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    step: Step,
    *,
    headers: Mapping[str, str] | None = None,
    data: Mapping[str, str] | None = None,
    json_body: Any = None,
    client_timeout: aiohttp.ClientTimeout | None = None,
) -> Reply:
    """Send one request; connection problems become :class:`Transient` naming ``step``.

    Without ``client_timeout`` the session's own timeout applies (``TIMEOUT`` for
    :func:`new_session`), so whoever builds the session decides, tests included.
    """
    timeout = session.timeout if client_timeout is None else client_timeout
    try:
        async with session.request(
            method,
            url,
            headers=headers,
            data=data,
            json=json_body,
            timeout=timeout,
            allow_redirects=False,
        ) as resp:
            if (resp.content_length or 0) > MAX_BODY:
                raise Transient(step, f"response from {_host(url)} is larger than {MAX_BODY} bytes")
            # read(n) returns what has arrived, up to n: loop to the end or past the bound.
            body = bytearray()
            while chunk := await resp.content.read(MAX_BODY + 1 - len(body)):
                body += chunk
                if len(body) > MAX_BODY:
                    raise Transient(step, f"response from {_host(url)} is larger than {MAX_BODY} bytes")
            return Reply(resp.status, bytes(body), dict(resp.headers))
    except TimeoutError:
        raise Transient(step, f"timed out talking to {_host(url)}") from None
    except aiohttp.ClientError as exc:
        raise Transient(step, f"cannot reach {_host(url)}: {_cause(exc)}") from None
    except asyncio.CancelledError:
        raise


def _cause(exc: aiohttp.ClientError) -> str:
    """The class and the OS's words (DNS failure, refused, unreachable): what the operator fixes."""
    os_error = getattr(exc, "os_error", None)
    words = (os_error.strerror or str(os_error)) if isinstance(os_error, OSError) else ""
    return f"{type(exc).__name__} ({words})" if words else type(exc).__name__


def _host(url: str) -> str:
    return url.split("/")[2] if "//" in url else url


def retry_after(reply: Reply) -> float | None:
    value = reply.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def upstream_error(
    step: Step,
    reply: Reply,
    fixes: Mapping[str, str] | None = None,
    transient: frozenset[int] = TRANSIENT_STATUSES,
) -> BrokerError:
    """Turn a non-2xx reply into Transient or Denied with the upstream's reason.

    Understands OAuth errors (``{"error", "error_description"}``, STS and Azure)
    and Google API errors (``{"error": {"code", "message", "status"}}``).
    """
    code, message = _decode_error(reply.body)
    fix = (fixes or {}).get(code, "")
    kind = Transient if reply.status in transient else Denied
    reason = f"{code}: {message}" if code and message else (code or message or "no error body")
    return kind(
        step, reason, fix=fix, upstream_status=reply.status, retry_after=retry_after(reply), code=code
    )


def _decode_error(body: bytes) -> tuple[str, str]:
    try:
        data = loads(body)
    except ValueError:
        text = body[:300].decode("utf-8", "replace").strip()
        return "", text
    if not isinstance(data, dict):
        return "", ""
    err = data.get("error")
    if isinstance(err, dict):
        reason = ""
        for detail in err.get("details") or []:
            if isinstance(detail, dict) and detail.get("reason"):
                reason = str(detail["reason"])
        return str(err.get("status") or err.get("code") or ""), str(err.get("message", "")) + (
            f" [{reason}]" if reason else ""
        )
    return str(err or ""), str(data.get("error_description", ""))

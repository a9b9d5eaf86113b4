"""Plumbing shared by the fake Google services: recording and test knobs.

Every request is recorded *before* any knob acts on it, so a test can assert on
what the broker sent even when the fake was told to fail or is holding the
request behind a gate. Knobs act in a fixed order: record, gate, delay, canned
failure, then real validation.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it. Header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = field(repr=False)
    form: dict[str, str] | None = None
    json: Any = None
    at: float = 0.0  # the fake's clock when the request arrived


@dataclass(frozen=True)
class _Canned:
    status: int
    body: dict[str, Any] | str
    headers: dict[str, str] | None


_RECORDED = web.RequestKey("fakes.recorded", Recorded)


def recorded(request: web.Request) -> Recorded:
    """The record the middleware made of this request (its parsed body)."""
    return request[_RECORDED]


def media_type(request: web.Request) -> str:
    """The Content-Type without parameters, lower-cased ('' when absent)."""
    return request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def is_json_type(mime: str) -> bool:
    return mime in ("application/json", "text/json")


def oauth_error(error: str, description: str, status: int = 400) -> web.Response:
    """An RFC 6749 §5.2 error, the shape STS answers with."""
    return web.json_response({"error": error, "error_description": description}, status=status)


def error_info(reason: str, domain: str, **metadata: str) -> dict[str, Any]:
    """A ``google.rpc.ErrorInfo`` detail entry."""
    return {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": domain,
        "metadata": metadata,
    }


def google_error(
    code: int,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A standard Google API error body, the shape IAM Credentials answers with."""
    error: dict[str, Any] = {"code": code, "message": message, "status": _GOOGLE_STATUS.get(code, "UNKNOWN")}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=code, headers=headers)


def _parse_body(mime: str, body: bytes) -> tuple[dict[str, str] | None, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None, None
    if mime == "application/x-www-form-urlencoded":
        # First occurrence wins for a repeated field.
        form: dict[str, str] = {}
        for key, value in parse_qsl(text, keep_blank_values=True):
            form.setdefault(key, value)
        return form, None
    if is_json_type(mime):
        try:
            return None, json.loads(text)
        except json.JSONDecodeError:
            return None, None
    return None, None


class FakeService:
    """Base of FakeSts and FakeIam: the call log and the knobs tests turn."""

    def __init__(self, *, lifetime_seconds: int, now: Callable[[], float] = time.time) -> None:
        self.now = now
        self.lifetime_seconds = lifetime_seconds
        self.delay_seconds: float = 0.0
        self.gate: asyncio.Event | None = None
        self.calls: list[Recorded] = []
        # One entry per fail_next call with the answers it has left, not one per answer: a
        # long outage is fail_next(count=10**6), and a million objects cost a second to make
        # and the garbage collector seconds to walk on every full pass thereafter.
        self._canned: deque[tuple[_Canned, int]] = deque()  # (answer, times left)

    def fail_next(
        self,
        status: int,
        body: dict[str, Any] | str,
        count: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``count`` requests with this response instead of the real logic."""
        if count > 0:
            self._canned.append((_Canned(status, body, headers), count))

    def recover(self) -> None:
        """Drop the canned answers still queued: the real logic answers again."""
        self._canned.clear()

    def app(self) -> web.Application:
        """A fresh aiohttp application serving this fake."""
        application = web.Application(middlewares=[self._knobs])
        self._add_routes(application)
        return application

    def _add_routes(self, application: web.Application) -> None:
        raise NotImplementedError

    @web.middleware
    async def _knobs(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        form, parsed_json = _parse_body(media_type(request), body)
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        call = Recorded(request.method, request.path, headers, body, form, parsed_json, self.now())
        self.calls.append(call)
        request[_RECORDED] = call
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_seconds > 0:
            await asyncio.sleep(self.delay_seconds)
        if self._canned:
            canned, left = self._canned.popleft()
            if left > 1:
                self._canned.appendleft((canned, left - 1))
            if isinstance(canned.body, str):
                return web.Response(status=canned.status, text=canned.body, headers=canned.headers)
            return web.json_response(canned.body, status=canned.status, headers=canned.headers)
        return await handler(request)


async def serve_loopback(
    app: web.Application, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on an ephemeral 127.0.0.1 port; returns the runner and base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        host, port = runner.addresses[0][:2]
    except BaseException:
        await runner.cleanup()
        raise
    return runner, f"{'https' if ssl_context else 'http'}://{host}:{port}"


Service = tuple[str, web.Application, ssl.SSLContext | None]  # name, app, TLS or plain


class LoopbackServices:
    """Fake services on 127.0.0.1 ephemeral ports, started and stopped together.

    Subclasses list them in :meth:`_services`; use as ``async with`` or call
    :meth:`start` / :meth:`close` (both idempotent). URLs exist once started.
    """

    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []
        self._bases: dict[str, str] = {}

    def _services(self) -> list[Service]:
        raise NotImplementedError

    async def _before_start(self) -> None:
        """Hook: prepare what :meth:`_services` needs (e.g. a test CA)."""

    async def _after_close(self) -> None:
        """Hook: release what :meth:`_before_start` made."""

    async def start(self) -> Self:
        if self._runners:
            return self
        try:
            await self._before_start()
            for name, app, context in self._services():
                runner, self._bases[name] = await serve_loopback(app, context)
                self._runners.append(runner)
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()
        self._bases.clear()
        await self._after_close()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _base(self, name: str) -> str:
        if name not in self._bases:
            raise RuntimeError(
                f"{type(self).__name__} is not running; use 'async with' or await start() first"
            )
        return self._bases[name]

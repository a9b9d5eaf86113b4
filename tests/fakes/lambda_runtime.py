"""A strict fake of the AWS Lambda Extensions API, for one external extension.

Follows docs.aws.amazon.com/lambda/latest/dg/runtimes-extensions-api.html:
``POST /2020-01-01/extension/register`` (``Lambda-Extension-Name``, ``{"events": [...]}``
→ 200 with ``Lambda-Extension-Identifier``), ``GET …/event/next`` (long-polled until the
test delivers an INVOKE or SHUTDOWN event; 200 with ``Lambda-Extension-Event-Identifier``),
``POST …/init/error`` and ``…/exit/error`` (identifier and
``Lambda-Extension-Function-Error-Type`` headers → 202 ``{"status": "OK"}``).

Anything out of protocol (a call before register, a second register, a wrong
identifier or name, two polls at once, a poll after init/error or SHUTDOWN) is
answered with an error *and* recorded in :attr:`violations`, which tests assert empty.
Each poll records :attr:`probe` (e.g. the fake STS call count) at the moment it
arrives, so a test can tell what the extension had finished before asking.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from broker.fakes._service import LoopbackServices, Service

PREFIX = "/2020-01-01/extension"
INVOKED_ARN = "arn:aws:lambda:us-east-2:123456789012:function:wif-broker-test"


@dataclass(frozen=True)
class Poll:
    """One ``event/next`` call: when it arrived and what :attr:`FakeLambdaRuntime.probe` said."""

    at: float
    probe: Any


@dataclass(frozen=True)
class ErrorReport:
    path: str  # "init/error" | "exit/error"
    error_type: str  # the Lambda-Extension-Function-Error-Type header
    body: dict[str, Any]


@dataclass
class _State:
    registered: bool = False
    events: list[str] = field(default_factory=list)
    polling: bool = False
    finished: str = ""  # why no further poll is allowed


class FakeLambdaRuntime(LoopbackServices):
    def __init__(
        self, extension_name: str = "wif-broker", *, probe: Callable[[], Any] = lambda: None
    ) -> None:
        super().__init__()
        self.extension_name = extension_name
        self.probe = probe
        self.identifier = str(uuid.uuid4())
        self.calls: list[str] = []  # "register", "next", "init/error", "exit/error" in order
        self.polls: list[Poll] = []
        self.errors: list[ErrorReport] = []
        self.violations: list[str] = []
        self.registered_at: float | None = None
        self._state = _State()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._poll_arrived = asyncio.Condition()

    def _services(self) -> list[Service]:
        app = web.Application()
        app.router.add_post(f"{PREFIX}/register", self._register)
        app.router.add_get(f"{PREFIX}/event/next", self._next)
        app.router.add_post(f"{PREFIX}/init/error", self._error)
        app.router.add_post(f"{PREFIX}/exit/error", self._error)
        return [("api", app, None)]

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, the value of ``AWS_LAMBDA_RUNTIME_API``."""
        return self._base("api").removeprefix("http://")

    async def close(self) -> None:
        self._queue.put_nowait(None)  # release a pending poll so the server can stop
        await super().close()

    # -- what tests call ---------------------------------------------------------------

    def deliver_invoke(self, request_id: str | None = None, timeout_seconds: float = 30.0) -> str:
        request_id = request_id or str(uuid.uuid4())
        self._queue.put_nowait(
            {
                "eventType": "INVOKE",
                "deadlineMs": int((time.time() + timeout_seconds) * 1000),
                "requestId": request_id,
                "invokedFunctionArn": INVOKED_ARN,
                "tracing": {"type": "X-Amzn-Trace-Id", "value": f"Root=1-{uuid.uuid4().hex[:8]}-0;Sampled=1"},
            }
        )
        return request_id

    def deliver_shutdown(self, reason: str = "SPINDOWN", deadline_seconds: float = 2.0) -> float:
        """Queue SHUTDOWN; returns its deadline (epoch seconds)."""
        deadline = time.time() + deadline_seconds
        self._queue.put_nowait(
            {"eventType": "SHUTDOWN", "shutdownReason": reason, "deadlineMs": int(deadline * 1000)}
        )
        return deadline

    def deliver_failure(self) -> None:
        """Answer the pending poll as Lambda does when the sandbox is broken (HTTP 500)."""
        self._queue.put_nowait({"eventType": "FAIL"})

    async def wait_for_poll(self, count: int, limit_seconds: float = 30.0) -> Poll:
        """Wait until the extension has called event/next ``count`` times in all."""
        async with asyncio.timeout(limit_seconds), self._poll_arrived:
            await self._poll_arrived.wait_for(lambda: len(self.polls) >= count)
        return self.polls[count - 1]

    async def wait_for_error(self, limit_seconds: float = 30.0) -> ErrorReport:
        async with asyncio.timeout(limit_seconds), self._poll_arrived:
            await self._poll_arrived.wait_for(lambda: bool(self.errors))
        return self.errors[0]

    # -- the API ---------------------------------------------------------------------

    def _refuse(self, status: int, error_type: str, message: str) -> web.Response:
        self.violations.append(f"{error_type}: {message}")
        return web.json_response({"errorMessage": message, "errorType": error_type}, status=status)

    def _check_identifier(self, request: web.Request) -> web.Response | None:
        if not self._state.registered:
            return self._refuse(403, "Extension.Unregistered", f"{request.path} before register")
        if request.headers.get("Lambda-Extension-Identifier") != self.identifier:
            return self._refuse(403, "Extension.InvalidExtensionIdentifier", "wrong or missing identifier")
        return None

    async def _register(self, request: web.Request) -> web.Response:
        self.calls.append("register")
        if self._state.registered:
            return self._refuse(403, "Extension.AlreadyRegistered", "register called twice")
        name = request.headers.get("Lambda-Extension-Name", "")
        if name != self.extension_name:
            return self._refuse(403, "Extension.InvalidName", f"name {name!r} is not the file name")
        try:
            body = json.loads(await request.read())
            events = body["events"]
        except (ValueError, KeyError, TypeError):
            return self._refuse(400, "InvalidRequestFormat", "body is not {'events': [...]}")
        if not isinstance(events, list) or not set(events) <= {"INVOKE", "SHUTDOWN"}:
            return self._refuse(400, "InvalidRequestFormat", f"events {events!r}")
        self._state.registered, self._state.events = True, events
        self.registered_at = time.time()
        return web.json_response(
            {"functionName": "wif-broker-test", "functionVersion": "$LATEST", "handler": "app.handler"},
            headers={"Lambda-Extension-Identifier": self.identifier},
        )

    async def _next(self, request: web.Request) -> web.Response:
        self.calls.append("next")
        refused = self._check_identifier(request)
        if refused is not None:
            return refused
        if self._state.finished:
            return self._refuse(403, "Extension.Finished", f"event/next after {self._state.finished}")
        if self._state.polling:
            return self._refuse(400, "Extension.ConcurrentPoll", "two event/next calls at once")
        self._state.polling = True
        async with self._poll_arrived:
            self.polls.append(Poll(time.time(), self.probe()))
            self._poll_arrived.notify_all()
        try:
            event = await self._queue.get()
        finally:
            self._state.polling = False
        if event is None:
            closed = {"errorMessage": "runtime closed", "errorType": "Fake.Closed"}
            return web.json_response(closed, status=500)
        if event["eventType"] == "FAIL":
            failed = {"errorMessage": "State transition failed", "errorType": "Runtime.ContainerError"}
            return web.json_response(failed, status=500)
        if event["eventType"] == "SHUTDOWN":
            self._state.finished = "SHUTDOWN"
        return web.json_response(event, headers={"Lambda-Extension-Event-Identifier": str(uuid.uuid4())})

    async def _error(self, request: web.Request) -> web.Response:
        path = request.path.removeprefix(PREFIX + "/")
        self.calls.append(path)
        refused = self._check_identifier(request)
        if refused is not None:
            return refused
        error_type = request.headers.get("Lambda-Extension-Function-Error-Type", "")
        if "." not in error_type:
            return self._refuse(400, "InvalidErrorType", f"error type {error_type!r} is not Category.Reason")
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return self._refuse(400, "InvalidRequestFormat", "error body is not JSON")
        if path == "init/error" and self.polls:
            self.violations.append("init/error after the first event/next (init was over)")
        self._state.finished = path
        async with self._poll_arrived:
            self.errors.append(ErrorReport(path, error_type, body))
            self._poll_arrived.notify_all()
        return web.json_response({"status": "OK"}, status=202)

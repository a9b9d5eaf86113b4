"""Connection limits of the listeners (SPEC §8 "connections"), in one place.

Any local process can open sockets to the broker, so what a connection may cost
is bounded here rather than left to aiohttp's defaults (no head timeout, an
hour of keep-alive, no connection cap):

* a request head not complete within ``HEAD_TIMEOUT`` (10 s) of the connection
  opening, or of the first byte of a later request on it → connection closed
  (slowloris: bytes dribbled forever hold a socket and a parser);
* an idle keep-alive connection is closed after ``KEEPALIVE_TIMEOUT`` (60 s);
* at ``MAX_CONNECTIONS`` (1,024) open connections a new one displaces the oldest
  connection that has no request in progress (a head not yet complete, or an idle
  keep-alive): a local process holding half-open sockets cannot lock legitimate
  clients out, since their heads arrive at once and they are never the oldest idle
  one. Only when every connection is serving a request does a new one get a bare
  503 with the GCE headers and is closed; the file descriptors left are for
  upstream calls and the admin probes;
* accept errors (``EMFILE``, out of file descriptors) are logged at most once a
  second, without a traceback: asyncio logs each with one otherwise, per
  listener, for as long as the shortage lasts;
* the soft ``RLIMIT_NOFILE`` is raised to the hard limit at start (containers
  often start with 1,024 soft, which the connection cap alone would use up);
* a request refused by the upstream budget (429) gets its answer after a pause
  (:func:`pace_refusal`, 0.5 to 1 s, never past the ``Retry-After`` it carries):
  a caller cycling through distinct audiences in a closed loop is held to about
  a request per second per connection instead of taking the one event loop from
  everyone else (bench/abuse.py). Jittered, so the refused do not come back in
  step; a paused connection counts as idle at the cap (displaceable), so parked
  requests cannot lock other clients out.

Long-polls are bounded where they wait (``watch.py``); a client that hangs up
frees its slot at once (``handler_cancellation``). The limits are a frozen
value given to :class:`GuardedRunner`; tests shorten them there (keep-alive),
never through a user setting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger("broker.listener")
HEAD_TIMEOUT: Final = 10.0
KEEPALIVE_TIMEOUT: Final = 60.0
MAX_CONNECTIONS: Final = 1024
REFUSAL_PAUSE: Final = (0.5, 1.0)
# One connection past the cap is answered this and closed: a client sees why.
_FULL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Metadata-Flavor: Google\r\n"
    b"Server: Metadata Server for VM\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 37\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"Service Unavailable: too many clients"
)
_NR_OPEN: Final = 1 << 20
_ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message (selector_events.py)


@dataclass(frozen=True, slots=True)
class Limits:
    head_timeout: float = HEAD_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    refusal_pause: tuple[float, float] = REFUSAL_PAUSE  # seconds, drawn uniformly


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose connections keep :class:`Limits`."""

    def __init__(
        self,
        app: web.Application,
        *,
        limits: Limits = Limits(),
        error_headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        # handler_cancellation: a client that hangs up ends its handler, so a dropped
        # long-poll frees its slot at once (token loads are shielded in the cache and
        # finish for the other waiters).
        kwargs.setdefault("handler_cancellation", True)
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self._limits = limits
        self._error_headers = dict(error_headers or {})

    async def _make_server(self) -> web.Server:
        # The app's own Server (startup signals run, handler and request factory
        # made), rebuilt as the subclass that makes guarded protocols.
        plain = await super()._make_server()
        return _Server(
            plain.request_handler,
            request_factory=plain.request_factory,
            limits=self._limits,
            error_headers=self._error_headers,
            **self._kwargs,
        )


class _Server(web.Server):
    def __init__(self, *args: Any, limits: Limits, error_headers: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.error_headers = error_headers
        self.open = 0  # connections whose protocol is live (aiohttp's dict lags: it waits for tasks)
        # Live connections, oldest first (a dict keeps insertion order): whom to displace.
        self.live: dict[_Protocol, None] = {}

    def displace_oldest_idle(self) -> bool:
        """Close the oldest connection with no request in progress; False if all are busy."""
        for protocol in self.live:
            if not protocol.busy:
                protocol.release()
                log.debug("displaced an idle connection at the cap", extra={"event": "displaced"})
                protocol.force_close()
                return True
        return False

    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class _Protocol(RequestHandler):
    __slots__ = ("_counted", "_head_timer", "_server", "paused")

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager
        self._counted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self.paused = False  # its request's answer is a refusal held by pace_refusal

    @property
    def busy(self) -> bool:
        return bool(self._request_in_progress) and not self.paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._server
        if server.open >= server.limits.max_connections and not server.displace_oldest_idle():
            assert isinstance(transport, asyncio.Transport)
            transport.write(_FULL)
            self.force_close()
            return
        server.open += 1
        server.live[self] = None
        self._counted = True
        self._arm()  # the first head is due within head_timeout of the connection

    def release(self) -> None:
        """Stop counting this connection (it is closing)."""
        if self._counted:
            self._server.open -= 1
            self._server.live.pop(self, None)
            self._counted = False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.release()
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm()  # a head is complete; the keep-alive timer takes over after the answer
        elif self._head_timer is None and self.transport is not None:
            self._arm()  # the first bytes of a later request: its head is due from now

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Requests aiohttp refuses before any handler (a malformed head, HTTP/1.1
        without Host): the listener's headers (the GCE ones on the metadata
        listener, SPEC §3) and a fixed body, never aiohttp's, which may quote the
        request's bytes."""
        super().handle_error(request, status, exc, message)  # logs; raises if a response began
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        response = web.Response(
            status=status, text=f"{phrase}\n", content_type="text/plain", headers=self._server.error_headers
        )
        response.force_close()
        return response

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self._loop.call_later(self._server.limits.head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        log.debug("closed a connection whose request head was incomplete", extra={"event": "head_timeout"})
        self.force_close()


async def pace_refusal(request: web.BaseRequest) -> None:
    """Hold a 429's answer for the listener's ``refusal_pause`` (see the module's notes);
    the connection may be displaced meanwhile."""
    protocol = request.protocol if isinstance(request.protocol, _Protocol) else None
    low, high = protocol._server.limits.refusal_pause if protocol is not None else REFUSAL_PAUSE
    if protocol is not None:
        protocol.paused = True
    try:
        # Not a secret: jitter so that refused clients spread out.
        await asyncio.sleep(random.uniform(low, high))
    finally:
        if protocol is not None:
            protocol.paused = False


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (an unprivileged process may)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Linux refuses an infinite RLIMIT_NOFILE; its default ceiling (fs.nr_open) is 2^20.
    target = _NR_OPEN if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:  # keep what we have; the connection cap still holds
            log.warning(
                "cannot raise the open-files limit",
                extra={"event": "rlimit", "soft": soft, "hard": hard, "error": str(exc)},
            )


class AcceptErrorLog:
    """A loop exception handler: accept errors once a second, one line, no traceback.

    Everything else goes to the handler that was there before (asyncio's default).
    """

    def __init__(self, previous: Any = None, interval: float = 1.0) -> None:
        self._previous = previous
        self._interval = interval
        self._last = -interval
        self._suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _resume_after_close(context):
            # asyncio retries accepting 1 s after EMFILE even if the listener was
            # closed meanwhile (at shutdown) and fails on fd -1: nothing to report.
            log.debug("accept retry on a closed listener", extra={"event": "accept_error"})
            return
        if context.get("message") != _ACCEPT_ERROR:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = loop.time()  # the loop's monotonic clock; rate limiting, not token expiry
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        self._last = now
        exc = context.get("exception")
        log.error(
            "cannot accept connections: out of file descriptors or memory",
            extra={
                "event": "accept_error",
                "error": type(exc).__name__ if exc else "",
                "errno": getattr(exc, "errno", None),
                "suppressed": self._suppressed,  # repeats not logged in the last interval
            },
        )
        self._suppressed = 0


def _resume_after_close(context: dict[str, Any]) -> bool:
    callback = getattr(context.get("handle"), "_callback", None)
    return getattr(callback, "__name__", "") == "_start_serving" and isinstance(
        context.get("exception"), ValueError
    )


class MalformedRequests(logging.Filter):
    """aiohttp logs each request its parser refuses (an oversized head, bad syntax) at
    ERROR with a traceback, so any local process could fill the log at will, and the
    message may quote the request's bytes. One WARNING line naming the error instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "refused a malformed HTTP request: %s (HTTP %d)"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info, record.exc_text = None, None
            record.event = "bad_request"
        return True


_MALFORMED = MalformedRequests()


def prepare_process(loop: asyncio.AbstractEventLoop) -> None:
    """Before the listeners open: the fd limit raised, accept errors rate-limited, refused
    requests logged in one line (idempotent)."""
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED)  # adding it twice is a no-op
    raise_fd_limit()
    previous = loop.get_exception_handler()
    if not isinstance(previous, AcceptErrorLog):
        loop.set_exception_handler(AcceptErrorLog(previous))

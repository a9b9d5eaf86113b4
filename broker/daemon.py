"""The daemon life-cycle: start admin, start metadata, pre-warm, serve, drain.

The two listeners share one token chain, so the resources are owned here (one
``AsyncExitStack``) rather than by either app's ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from broker import httpclient
from broker.admin import SERVER as ADMIN_SERVER
from broker.admin import create_admin_app
from broker.chain import TokenChain
from broker.clock import Clock, SystemClock
from broker.errors import BrokerError, ConfigError
from broker.metadata import listener
from broker.metadata.app import create_metadata_app
from broker.metadata.wire import GCE_HEADERS
from broker.settings import Address, Settings
from broker.sources import SubjectTokenSource, build_source

log = logging.getLogger("broker.daemon")
DRAIN_SECONDS = 8.0  # SPEC §3: exit within 10 s of SIGTERM


class _MalformedRequests(logging.Filter):
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


_MALFORMED = _MalformedRequests()


async def serve(
    settings: Settings,
    *,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[list[str], list[str]], Awaitable[None]] | None = None,
    on_chain: Callable[[TokenChain], None] | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT), then drain and return.

    ``on_chain`` receives the token chain once both listeners are up, for a host that
    drives refreshes itself (the Lambda extension refreshes on each INVOKE).
    """
    clock = clock or SystemClock()
    stop = stop or asyncio.Event()
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED)  # adding it twice is a no-op
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    shutdown = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        session = httpclient.new_session()
        stack.push_async_callback(session.close)
        source = build_source(settings.cred, session, aws_strict=settings.aws_strict)
        stack.push_async_callback(source.close)
        chain = TokenChain(settings, source, session, clock)
        stack.push_async_callback(chain.close)
        admin = listener.GuardedRunner(
            create_admin_app(chain),
            access_log=None,
            shutdown_timeout=2.0,
            error_headers={"Server": ADMIN_SERVER},
        )
        await admin.setup()
        stack.push_async_callback(admin.cleanup)
        await _listen(admin, settings.admin_listen, "admin-listen")
        runner = listener.GuardedRunner(
            create_metadata_app(settings, chain, clock, shutdown),
            error_headers=GCE_HEADERS,
            access_log=None,
            shutdown_timeout=DRAIN_SECONDS,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        for address in settings.listen:
            await _listen(runner, address, "listen", backlog=1024)
        addresses = [_fmt(a) for a in runner.addresses]
        admin_addresses = [_fmt(a) for a in admin.addresses]
        log.info(
            "listening",
            extra={
                "event": "start",
                "metadata": ",".join(addresses),
                "admin": ",".join(admin_addresses),
                "account": settings.email,
                "project": settings.project_id,
                "source": type(settings.cred.source).__name__,
            },
        )
        if on_listening is not None:
            await on_listening(addresses, admin_addresses)
        if on_chain is not None:
            on_chain(chain)
        warm = asyncio.create_task(_warm_and_describe(chain, source))
        await stop.wait()
        log.info("draining", extra={"event": "stop"})
        shutdown.set()  # release wait_for_change long-polls
        warm.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warm
    log.info("stopped", extra={"event": "stopped"})


async def _warm_and_describe(chain: TokenChain, source: SubjectTokenSource) -> None:
    await chain.warm()
    # Logged once: the identity Google sees, so an operator can compare it with
    # the provider's issuer/audience or the IAM binding without running check.
    try:
        seen = await source.describe()
    except BrokerError as exc:
        log.warning(
            "cannot describe the native identity", extra={"event": "identity", "error": exc.describe()}
        )
        return
    log.info("native identity", extra={"event": "identity", "kind": source.kind, **seen})
    if seen.get("bind"):
        # An AWS role is known only from GetCallerIdentity: later IAM denials name its member.
        chain.steps.learn_member(seen["bind"])


async def _listen(runner: web.AppRunner, address: Address, setting: str, **kwargs: Any) -> None:
    """Bind one listener. A port in use or an address this host does not have is a
    configuration error naming the setting (one line, exit 2), not a traceback."""
    # Before the first socket opens: fd limit raised, accept errors rate-limited (idempotent).
    listener.prepare_process(asyncio.get_running_loop())
    try:
        await web.TCPSite(runner, address.host, address.port, **kwargs).start()
    except OSError as exc:
        raise ConfigError(setting, f"cannot listen on {address}: {exc.strerror or exc}") from None


def _fmt(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)

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

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from broker import httpclient
from broker.admin import create_admin_app
from broker.chain import TokenChain
from broker.clock import Clock, SystemClock
from broker.errors import BrokerError
from broker.metadata.app import create_metadata_app
from broker.settings import Settings
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
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT), then drain and return."""
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
        admin = web.AppRunner(create_admin_app(chain), access_log=None, shutdown_timeout=2.0)
        await admin.setup()
        stack.push_async_callback(admin.cleanup)
        await web.TCPSite(admin, settings.admin_listen.host, settings.admin_listen.port).start()
        runner = web.AppRunner(
            create_metadata_app(settings, chain, clock, shutdown),
            access_log=None,
            shutdown_timeout=DRAIN_SECONDS,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        for address in settings.listen:
            await web.TCPSite(runner, address.host, address.port, backlog=1024).start()
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
    # SPEC §8: run contacts only the subject-token source, STS and IAM. Describing an
    # AWS principal takes a GetCallerIdentity call to AWS STS, which the chain never
    # needs and which hangs in a private subnet without an STS endpoint: only `check`
    # does that. The other sources describe what they fetch anyway (a token's claims).
    if source.kind == "aws":
        return
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


def _fmt(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)

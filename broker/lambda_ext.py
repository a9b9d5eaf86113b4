"""``wif-broker lambda-extension``: the broker as an AWS Lambda external extension (SPEC §10).

Order matters. Registering comes first, before any setting is read, so that even a
configuration error reaches Lambda through ``init/error`` (an extension that exits
without registering only shows up as a generic init failure). Then the daemon starts
(``daemon.serve``, the same server as everywhere else), the default token is minted,
and only then does the extension ask for its first event: Lambda starts the function
once every extension has asked, so the first invoke is served from cache.

Lambda freezes the sandbox between invokes, so the cache's refresh timers cannot be
trusted. On each INVOKE the extension refreshes whatever is inside its refresh window
before asking for the next event (the function runs meanwhile, and any request it
makes joins the same single-flight refresh). The cache compares every hit with the
wall clock, so a token with less than ``min-serve-ttl`` left is never served after a
thaw, even if the function asks first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from broker import daemon, logs, settings
from broker.chain import TokenChain
from broker.clock import Clock, SystemClock
from broker.errors import BrokerError, ConfigError
from broker.lambda_api import Event, ExtensionsApi, ExtensionsApiError

log = logging.getLogger("broker.lambda")
EVENTS = ("INVOKE", "SHUTDOWN")
LOOPBACK_ADMIN = "127.0.0.1:8989"
# Lambda gives extensions and the runtime 10 s of init in all; leave room for the function.
MINT_SECONDS = 8.0
# Exit this long before the SHUTDOWN deadline: Lambda kills what is still running then, and
# after the cut the process still closes sockets and tears the interpreter down, which on
# a small function's fraction of a vCPU takes a good part of this.
SHUTDOWN_MARGIN_SECONDS = 0.25


def extension_name(argv0: str) -> str:
    """Lambda requires ``Lambda-Extension-Name`` to be the executable's file name."""
    name = os.path.basename(argv0)
    # ``python -m broker`` runs broker/__main__.py: name the extension as the layer does.
    return "wif-broker" if name.endswith(".py") or not name else name


async def run_extension(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    name: str,
    clock: Clock | None = None,
) -> int:
    """Register, start, mint, then serve events until SHUTDOWN. Returns the exit status."""
    runtime_api = environ.get("AWS_LAMBDA_RUNTIME_API", "")
    if not runtime_api:
        print("wif-broker: AWS_LAMBDA_RUNTIME_API is not set: not inside AWS Lambda", file=sys.stderr)
        return 2
    api = ExtensionsApi(runtime_api)
    try:
        try:
            await api.register(name, EVENTS)
        except ExtensionsApiError as exc:
            print(f"wif-broker: cannot register with Lambda: {exc}", file=sys.stderr)
            return 1
        try:
            resolved = settings.build(_lambda_defaults(flags, environ), environ)
        except ConfigError as exc:
            await _report(api.init_error, "Extension.ConfigError", f"configuration error: {exc}")
            return 2
        logs.setup_logging(resolved.log_level, resolved.log_format)
        return await _serve(api, resolved, clock or SystemClock())
    finally:
        await api.close()


def _lambda_defaults(flags: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The admin listener stays on loopback in a sandbox unless configured otherwise."""
    merged = dict(flags)
    spec_default = next(s.default for s in settings.SPECS if s.name == "admin-listen")
    if settings.collect(flags, environ)["admin-listen"] == spec_default:
        merged["admin_listen"] = LOOPBACK_ADMIN
    return merged


async def _serve(api: ExtensionsApi, resolved: settings.Settings, clock: Clock) -> int:
    stop = asyncio.Event()
    handed: asyncio.Future[TokenChain] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(daemon.serve(resolved, clock=clock, stop=stop, on_chain=handed.set_result))
    try:
        started: set[asyncio.Future[Any]] = {server, handed}
        await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
        if not handed.done():
            error = server.exception() if not server.cancelled() else None
            message = f"the metadata server did not start: {error}"
            await _report(api.init_error, "Extension.StartError", message)
            return 1
        chain = handed.result()
        try:
            async with asyncio.timeout(MINT_SECONDS):
                await chain.access_token(resolved.scopes)
        except (BrokerError, TimeoutError) as exc:
            late = f"no token within {MINT_SECONDS:.0f}s"
            reason = exc.describe() if isinstance(exc, BrokerError) else late
            await _report(api.init_error, "Extension.MintError", f"cannot mint the default token: {reason}")
            return 1
        log.info("extension ready", extra={"event": "lambda_init"})
        return await _event_loop(api, chain, server, stop, clock)
    finally:
        stop.set()
        if not server.cancelling():  # a SHUTDOWN past its deadline has cancelled it already
            await asyncio.wait({server}, timeout=daemon.DRAIN_SECONDS)
        server.cancel()  # a no-op once it has drained
        await asyncio.gather(server, return_exceptions=True)  # its failure was reported above


async def _event_loop(
    api: ExtensionsApi, chain: TokenChain, server: asyncio.Task[None], stop: asyncio.Event, clock: Clock
) -> int:
    while True:
        poll = asyncio.ensure_future(api.next_event())
        racing: set[asyncio.Future[Any]] = {poll, server}
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if not poll.done():
            poll.cancel()
            with contextlib.suppress(asyncio.CancelledError, ExtensionsApiError):
                await poll
            if stop.is_set() and not server.cancelled() and server.exception() is None:
                return 0  # SIGTERM: the daemon drained on its own
            await _report(api.exit_error, "Extension.ServerError", "the metadata server stopped unexpectedly")
            return 1
        try:
            event = poll.result()
        except ExtensionsApiError as exc:
            log.error("lambda event/next failed", extra={"event": "lambda_error", "error": str(exc)})
            await _report(api.exit_error, "Extension.RuntimeApiError", str(exc))
            return 1
        if event.kind == "SHUTDOWN":
            return await _shutdown(event, server, stop, clock)
        if event.kind == "INVOKE":
            # Before asking for the next event: the sandbox may be frozen right after.
            refreshed = await chain.refresh_due()
            if refreshed:
                log.info("refreshed on invoke", extra={"event": "lambda_invoke", "tokens": refreshed})


async def _shutdown(event: Event, server: asyncio.Task[None], stop: asyncio.Event, clock: Clock) -> int:
    """Stop accepting, let in-flight requests finish, and exit 0 before the deadline."""
    log.info("shutdown", extra={"event": "lambda_shutdown", "reason": event.shutdown_reason})
    stop.set()
    # The injected clock, not a computed timeout, so the cut can be tested without wall time.
    cut = asyncio.ensure_future(clock.sleep_until(event.deadline_ms / 1000 - SHUTDOWN_MARGIN_SECONDS))
    try:
        done, _ = await asyncio.wait({server, cut}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cut.cancel()
    if server not in done:
        # Lambda kills the sandbox at the deadline anyway; leaving first is the clean exit.
        log.warning("drain cut short by the shutdown deadline", extra={"event": "lambda_shutdown"})
        server.cancel()
    elif not server.cancelled() and server.exception() is not None:
        log.warning("drain failed", extra={"event": "lambda_shutdown", "error": repr(server.exception())})
    return 0


async def _report(call: Callable[[str, str], Awaitable[None]], error_type: str, message: str) -> None:
    log.error(message, extra={"event": "lambda_error", "error_type": error_type})
    try:
        await call(error_type, message)
    except ExtensionsApiError as exc:
        print(f"wif-broker: could not report {error_type} to Lambda: {exc}", file=sys.stderr)

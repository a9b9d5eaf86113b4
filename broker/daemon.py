"""The daemon life-cycle: start admin, start metadata, pre-warm, serve, drain.

The two listeners share one token chain, so the resources are owned here (one
``AsyncExitStack``) rather than by either app's ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from broker import binding, httpclient
from broker.admin import SERVER as ADMIN_SERVER
from broker.admin import create_admin_app
from broker.chain import TokenChain
from broker.clock import Clock, SystemClock
from broker.errors import BrokerError, ConfigError, ReloadError
from broker.metadata import listener
from broker.metadata.app import create_metadata_app
from broker.metadata.wire import GCE_HEADERS
from broker.settings import Settings
from broker.sources import SubjectTokenSource, build_source

log = logging.getLogger("broker.daemon")
DRAIN_SECONDS = 8.0  # SPEC §3: exit within 10 s of SIGTERM
LOAD_DRAIN_SECONDS = 5.0  # SPEC §8: in-flight upstream loads are failed (503) after this
RELOAD_WARM_SECONDS = 5.0  # SIGHUP: how long the new identity may take to mint before the swap


@dataclass(frozen=True)
class _Serving:
    """One configuration being served: its chain and the two listeners over it."""

    settings: Settings
    source: SubjectTokenSource
    chain: TokenChain
    admin: web.AppRunner
    metadata: web.AppRunner
    warm: asyncio.Task[None]
    listening: binding.Listening  # the sockets under both runners' sites


async def serve(
    settings: Settings,
    *,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[list[str], list[str]], Awaitable[None]] | None = None,
    on_chain: Callable[[TokenChain], None] | None = None,
    reload: Callable[[], Settings] | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT), then drain and return.

    ``on_chain`` receives the token chain once both listeners are up, for a host that
    drives refreshes itself (the Lambda extension refreshes on each INVOKE; it passes
    no ``reload``, so that chain is the one served until the end).

    SIGHUP calls ``reload`` (re-reads the settings and credential files, in a worker
    thread) and, when that succeeds, serves the new configuration on the same
    addresses; a :class:`ReloadError` leaves the running one in place (SPEC §8)."""
    clock = clock or SystemClock()
    stop = stop or asyncio.Event()
    hangup = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig, event in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, hangup)):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, event.set)
    shutdown = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        session = httpclient.new_session()
        stack.push_async_callback(session.close)
        serving = await _start(settings, session, clock, shutdown, None)
        addresses = [binding.display(a) for a in serving.metadata.addresses]
        admin_addresses = [binding.display(a) for a in serving.admin.addresses]
        if on_listening is not None:
            await on_listening(addresses, admin_addresses)
        if on_chain is not None:
            on_chain(serving.chain)
        retiring: set[asyncio.Task[None]] = set()
        chains = [serving.chain]  # every chain still draining or serving, for the abort below
        try:
            while not stop.is_set():
                await _first_of(stop, hangup)
                if hangup.is_set() and not stop.is_set():
                    hangup.clear()
                    reloading = asyncio.create_task(_reload(serving, reload, session, clock, shutdown))
                    stopping = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({reloading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    stopping.cancel()
                    if not reloading.done():  # SIGTERM while the new identity warms: drop it
                        reloading.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reloading
                        break
                    replaced = reloading.result()
                    # A failed reload may still have rebound the same runners elsewhere.
                    if replaced.chain is not serving.chain:
                        chains.append(replaced.chain)
                        # The old listeners drain in the background while the new ones serve.
                        task = asyncio.create_task(_stop(serving))
                        retiring.add(task)
                        task.add_done_callback(retiring.discard)
                    serving = replaced
        finally:
            log.info("draining", extra={"event": "stop"})
            shutdown.set()  # release wait_for_change long-polls
            # In-flight upstream loads get LOAD_DRAIN_SECONDS to finish; then they fail with
            # a 503 naming the step, so a hung upstream cannot hold the exit past 10 s.
            abort = loop.call_later(LOAD_DRAIN_SECONDS, _abort_loads, chains)
            try:
                await _stop(serving)
                for task in list(retiring):
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            finally:
                abort.cancel()
    log.info("stopped", extra={"event": "stopped"})


def _abort_loads(chains: list[TokenChain]) -> None:
    for chain in chains:
        chain.abort_loads()


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _start(
    settings: Settings,
    session: aiohttp.ClientSession,
    clock: Clock,
    shutdown: asyncio.Event,
    inherited: binding.Listening | None,
    handover: Callable[[], Awaitable[None]] | None = None,
) -> _Serving:
    """Build the chain, start the pre-warm, start admin then metadata listeners.

    ``inherited`` (a reload with the same listen settings): sockets to serve on instead
    of binding the settings' addresses; they are the running ones, duplicated.
    ``handover`` (a reload to other addresses): called before binding, to free the old
    ones. Either way a reload first waits until the new chain's default token is minted
    or RELOAD_WARM_SECONDS passed, so /readyz does not drop to 503 for the swap when the
    new identity works."""
    source = build_source(settings.cred, session, aws_strict=settings.aws_strict)
    chain = TokenChain(settings, source, session, clock)
    # At start-up the listeners come first (SPEC §5: the admin listener is up before the
    # first exchange, and a bind error is the only line of a failed start); a reload
    # warms the new identity first, while the old listeners still serve.
    warm: asyncio.Task[None] | None = None
    if inherited is not None or handover is not None:  # a reload
        warm = asyncio.create_task(_warm_and_describe(chain, source))
    admin = listener.GuardedRunner(
        create_admin_app(chain),
        access_log=None,
        shutdown_timeout=2.0,
        error_headers={"Server": ADMIN_SERVER},
    )
    metadata = listener.GuardedRunner(
        create_metadata_app(settings, chain, clock, shutdown),
        error_headers=GCE_HEADERS,
        access_log=None,
        shutdown_timeout=DRAIN_SECONDS,
    )
    listening = inherited
    try:
        if warm is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(warm), RELOAD_WARM_SECONDS)
        if handover is not None:
            await handover()
        # Before the first socket opens: fd limit raised, accept errors rate-limited (idempotent).
        listener.prepare_process(asyncio.get_running_loop())
        if listening is None:
            admin_at = (settings.admin_listen.host, settings.admin_listen.port)
            listening = await binding.bind_all([(a.host, a.port) for a in settings.listen], admin_at)
        await admin.setup()
        await binding.serve_on(admin, listening.admin)
        await metadata.setup()
        await binding.serve_on(metadata, listening.metadata)
    except BaseException:  # a bind error, or SIGTERM during a reload (cancelled)
        if warm is not None:
            warm.cancel()
        await metadata.cleanup()
        await admin.cleanup()
        if listening is not None:
            listening.close()
        await chain.close()
        await source.close()
        raise
    log.info(
        "listening",
        extra={
            "event": "start",
            "metadata": ",".join(binding.display(a) for a in metadata.addresses),
            "admin": ",".join(binding.display(a) for a in admin.addresses),
            "account": settings.email,
            "project": settings.project_id,
            "source": type(settings.cred.source).__name__,
        },
    )
    if warm is None:
        warm = asyncio.create_task(_warm_and_describe(chain, source))
    return _Serving(settings, source, chain, admin, metadata, warm, listening)


async def _stop(serving: _Serving) -> None:
    serving.warm.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving.warm
    await serving.metadata.cleanup()
    await serving.admin.cleanup()
    await serving.chain.close()
    await serving.source.close()


async def _reload(
    serving: _Serving,
    reload: Callable[[], Settings] | None,
    session: aiohttp.ClientSession,
    clock: Clock,
    shutdown: asyncio.Event,
) -> _Serving:
    """SIGHUP: the new configuration's listeners, or ``serving`` itself when nothing changes."""
    if reload is None:
        log.warning("SIGHUP ignored: this command has no files to re-read", extra={"event": "reload"})
        return serving
    try:
        fresh = await asyncio.to_thread(reload)
    except ReloadError as exc:
        # One line naming the file; the running configuration stays.
        log.error(
            "reload failed; still serving the previous configuration",
            extra={"event": "reload", "outcome": "error", "file": exc.file, "error": exc.problem},
        )
        return serving
    old = serving.settings
    metadata_at = [binding.host_port(a) for a in serving.metadata.addresses]
    was_bound = (metadata_at, binding.host_port(serving.admin.addresses[0]))
    same_listen = fresh.listen == old.listen and fresh.admin_listen == old.admin_listen
    freed: list[bool] = []

    async def stop_accepting() -> None:
        # Connections already open keep being served by the old runner until it is
        # cleaned up (in the background); its sites stop taking new ones.
        for site in [*serving.metadata.sites, *serving.admin.sites]:
            await site.stop()

    async def free_addresses() -> None:
        # Other addresses: the old sockets close before the new ones bind (an address may
        # be in both). Only here can a connection be refused for that instant.
        freed.append(True)
        await stop_accepting()

    try:
        if same_listen:
            # The running sockets, duplicated: one accept queue throughout (binding.py).
            replaced = await _start(fresh, session, clock, shutdown, serving.listening.dup())
            await stop_accepting()
        else:
            replaced = await _start(fresh, session, clock, shutdown, None, handover=free_addresses)
    except (OSError, BrokerError, ConfigError) as exc:
        log.error(
            "reload failed: cannot start the new listeners; back on the previous ones",
            extra={"event": "reload", "outcome": "error", "error": str(exc)},
        )
        if not freed:
            return serving
        relisten = await binding.bind_all(*was_bound)
        await binding.serve_on(serving.admin, relisten.admin)
        await binding.serve_on(serving.metadata, relisten.metadata)
        return dataclasses.replace(serving, listening=relisten)
    log.info(
        "reloaded",
        extra={
            "event": "reload",
            "outcome": "ok",
            "account": fresh.email,
            "identity_changed": fresh.email != old.email or fresh.cred != old.cred,
        },
    )
    return replaced


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
    if seen.get("bind"):
        # The narrowest member for this identity: later IAM denials name it (SPEC §11).
        chain.steps.learn_member(seen["bind"])

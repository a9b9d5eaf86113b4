"""The webhook's serving certificate, re-read when its files change (SPEC §9).

cert-manager and the kubelet rotate a mounted Secret by writing a new timestamped
directory and swapping the ``..data`` symlink, so the file paths never change but
what they resolve to does. Every :data:`POLL_SECONDS` the reloader compares the
resolved path, inode, size and mtime of both files; on a change it loads the pair
into a scratch context first (a half-written or mismatched pair keeps the old one
serving) and then into the live context, which every later handshake uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator

from broker import metrics
from broker.errors import ConfigError

log = logging.getLogger("broker.webhook.tls")
POLL_SECONDS = 5.0  # SPEC §9: a new certificate is served within 15 s of the change

Stamp = tuple[tuple[str, int, int, int], ...]


def _stamp(*paths: str) -> Stamp:
    out = []
    for path in paths:
        real = os.path.realpath(path)
        st = os.stat(real)
        out.append((real, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The live context; a bad pair at start-up is a configuration error (exit 2)."""
    for name, path in (("tls-cert-file", cert), ("tls-key-file", key)):
        if not os.path.isfile(path):
            raise ConfigError(name, f"file {path!r} does not exist")
    try:
        return _context(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls-cert-file", f"cannot load the certificate and key: {exc}") from None


class Reloader:
    def __init__(self, live: ssl.SSLContext, cert: str, key: str, poll_seconds: float = POLL_SECONDS) -> None:
        self.live, self.cert, self.key, self.poll_seconds = live, cert, key, poll_seconds
        self._seen = _stamp(cert, key)

    async def check(self) -> bool:
        """Reload when the files changed; True when a new pair is now served."""
        try:
            stamp = await asyncio.to_thread(_stamp, self.cert, self.key)
        except OSError as exc:  # mid-swap: a symlink briefly dangling
            log.warning("tls files unreadable, keeping the old certificate", extra={"error": str(exc)})
            return False
        if stamp == self._seen:
            return False
        try:
            # Parse in a thread on a scratch context: proves the pair matches, off the loop.
            await asyncio.to_thread(_context, self.cert, self.key)
            # Now the live one (small local files, already proven good). It is shared with
            # in-progress handshakes, so it is touched only from the loop thread.
            self.live.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            metrics.WEBHOOK_TLS_RELOADS.labels(outcome="error").inc()
            log.warning("new tls files do not load, keeping the old certificate", extra={"error": str(exc)})
            return False  # _seen unchanged: tried again on the next poll
        self._seen = stamp
        metrics.WEBHOOK_TLS_RELOADS.labels(outcome="ok").inc()
        log.info("reloaded the serving certificate", extra={"event": "tls_reload"})
        return True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Poll in the background for the life of the block (one owned task)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.poll_seconds)
                await self.check()

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

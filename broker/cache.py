"""A generic token cache: single-flight, refresh-ahead with jitter, stale-on-error.

Knows nothing of HTTP or Google: it receives a loader ``key -> Token`` and a
clock. Semantics (SPEC §4, reference/style-and-architecture.md §4):

* ``get`` returns a stored token while it has more than ``min_serve_ttl`` left;
  otherwise it joins the one in-flight load for the key or starts it. Check and
  insert happen with no ``await`` between, so concurrent callers share one call.
* Each stored token gets an owned background task that reloads it at
  ``refresh_at`` (``refresh_before`` plus jitter ahead of expiry), so callers never
  wait on rotation. A key's *first* token refreshes at a uniformly random point
  before that, so a fleet started together does not keep refreshing together.
  Keys nobody asked for since the last load are dropped instead of refreshed,
  unless ``keep_warm`` says otherwise.
* A failed refresh keeps serving the old token while it is servable and retries
  with capped exponential backoff and jitter; :class:`Denied` evicts. While a key
  has no servable token, its last error is returned until the backoff elapses,
  so a failing upstream is not hammered by retrying clients.
* Bounded (SPEC §8): at most ``max_entries`` keys (failed and in-flight ones too),
  least recently used evicted; a miss first takes from a shared :class:`TokenBucket`
  (empty: :class:`RateLimited`, nothing called). ``keep_warm`` keys are never
  evicted nor charged, so no caller can starve the default token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from broker import metrics
from broker.cachepolicy import Policy, TokenBucket
from broker.clock import Clock
from broker.errors import BrokerError, Denied, RateLimited, Step, Transient
from broker.tokens import Token

__all__ = ["Policy", "TokenBucket", "TokenCache"]
K = TypeVar("K", bound=Hashable)
log = logging.getLogger("broker.cache")


@dataclass(slots=True)
class _Entry:
    token: Token | None = None
    refresh_at: float = 0.0
    used: bool = False
    failures: int = 0
    last_error: BrokerError | None = None
    retry_at: float = 0.0


class TokenCache(Generic[K]):
    def __init__(
        self,
        kind: metrics.Kind,
        step: Step,
        loader: Callable[[K], Awaitable[Token]],
        clock: Clock,
        policy: Policy,
        *,
        keep_warm: Callable[[K], bool] = lambda key: False,
        rng: random.Random | None = None,
        max_entries: int | None = None,
        bucket: TokenBucket | None = None,
    ) -> None:
        self._kind = kind
        self._step = step  # named in the error when a loaded token is too short-lived
        self._loader = loader
        self._clock = clock
        self._policy = policy
        self._keep_warm = keep_warm
        self._rng = rng or random.Random()
        self._max_entries = max_entries
        self._bucket = bucket
        # Insertion order is recency order: hits move a key to the end, eviction takes the front.
        self._entries: OrderedDict[K, _Entry] = OrderedDict()
        self._inflight: dict[K, asyncio.Task[Token]] = {}
        self._refreshers: dict[K, asyncio.Task[None]] = {}
        self._closed = False
        # Counter cells resolved once: hit() is on every request's path.
        self._lookups = {r: metrics.CACHE_LOOKUPS.cell(kind.value, r.value) for r in metrics.CacheResult}
        self._stale = metrics.STALE_SERVED.labels(kind=kind.value)
        self._evictions = metrics.CACHE_EVICTIONS.labels(kind=kind.value)
        self._limited = metrics.RATE_LIMITED.labels(kind=kind.value)
        self._aborting = False
        ref = weakref.ref(self)
        metrics.EXPIRY.sources[kind] = lambda: c.soonest_expiry() if (c := ref()) else None

    # -- reading -----------------------------------------------------------------

    def servable(self, key: K) -> Token | None:
        """The stored token if it may be handed out now, without side effects."""
        entry = self._entries.get(key)
        if entry and entry.token and self._clock.wall() < entry.token.expires_at - self._policy.min_serve_ttl:
            return entry.token
        return None

    def last_error(self, key: K) -> BrokerError | None:
        entry = self._entries.get(key)
        return entry.last_error if entry else None

    def hit(self, key: K) -> Token | None:
        """The servable token, counted as a hit; None when a load is needed. Never awaits."""
        entry = self._entries.get(key)
        if entry is None or entry.token is None:
            return None
        if self._clock.wall() >= entry.token.expires_at - self._policy.min_serve_ttl:
            return None
        entry.used = True
        self._entries.move_to_end(key)  # recency, for the cap
        self._lookups[metrics.CacheResult.HIT].value += 1
        if entry.failures:
            self._stale.inc()
        return entry.token

    async def get(self, key: K) -> Token:
        token = self.hit(key)
        if token is not None:
            return token
        entry = self._entries.get(key)
        task = self._inflight.get(key)
        if task is not None:
            self._count(metrics.CacheResult.JOINED)
            return await asyncio.shield(task)
        if entry and entry.last_error and self._clock.wall() < entry.retry_at:
            self._entries.move_to_end(key)
            raise entry.last_error
        if self._bucket is not None and not self._keep_warm(key):
            try:
                self._bucket.take_or_refuse(self._step)
            except RateLimited:
                self._limited.inc()
                raise
        self._count(metrics.CacheResult.MISS)
        if entry is None:
            # Inside the cap from the start: an in-flight or failed key holds a slot too.
            self._entries[key] = _Entry()
            self._evict()
        else:
            self._entries.move_to_end(key)
        return await asyncio.shield(self._start_load(key))

    def retry_at(self, key: K) -> float:
        """When a failed key may next call upstream (0 when it has not failed)."""
        entry = self._entries.get(key)
        return entry.retry_at if entry and entry.last_error else 0.0

    def busy(self, key: K) -> bool:
        """A load of ``key`` is running or scheduled (refresh or retry)."""
        return key in self._inflight or key in self._refreshers

    def any_servable(self) -> bool:
        limit = self._clock.wall() + self._policy.min_serve_ttl
        return any(e.token is not None and e.token.expires_at > limit for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        if self._max_entries is None or len(self._entries) <= self._max_entries:
            return
        for key in list(self._entries):
            if len(self._entries) <= self._max_entries:
                break
            if self._keep_warm(key):
                continue
            del self._entries[key]
            if (refresher := self._refreshers.pop(key, None)) is not None:
                refresher.cancel()
            self._evictions.inc()
        self._publish()

    def soonest_expiry(self) -> float | None:
        expiries = [e.token.expires_at for e in self._entries.values() if e.token]
        return min(expiries) - self._clock.wall() if expiries else None

    # -- loading -----------------------------------------------------------------

    def _start_load(self, key: K) -> asyncio.Task[Token]:
        task = asyncio.get_running_loop().create_task(self._load(key))
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # A load nobody awaits any more (every caller cancelled) must not log
        # "exception never retrieved"; errors are recorded on the entry instead.
        task.add_done_callback(_consume)
        return task

    async def _load(self, key: K) -> Token:
        started = self._clock.wall()
        try:
            token = await self._loader(key)
            left = token.expires_at - self._clock.wall()
            if left <= self._policy.min_serve_ttl:
                raise Transient(
                    self._step,
                    f"upstream issued a {self._kind.value} token valid for {left:.0f}s, "
                    f"not more than min-serve-ttl ({self._policy.min_serve_ttl:.0f}s)",
                    fix="lower min-serve-ttl or raise the token lifetime",
                )
        except asyncio.CancelledError:
            if not self._aborting:
                raise
            # Draining (SIGTERM): callers get a 503 naming the step, not a reset connection.
            raise Transient(self._step, "the broker is shutting down", fix="retry") from None
        except BrokerError as exc:
            entry = self._entries.get(key)
            if entry is None:  # evicted while loading: nothing to remember
                raise
            entry.failures += 1
            entry.last_error = exc
            entry.retry_at = started + self._policy.backoff(entry.failures, exc.retry_after, self._rng)
            if isinstance(exc, Denied):
                entry.token = None
            self._publish()
            raise
        entry = self._entries.get(key)
        if entry is None:
            if self._max_entries is None:
                entry = self._entries[key] = _Entry()
            else:
                return token  # evicted while loading: the waiting callers still get it
        first = entry.token is None
        entry.token, entry.failures, entry.last_error = token, 0, None
        entry.refresh_at = self._policy.refresh_at(token.expires_at, started, self._rng, first=first)
        self._publish()
        if key not in self._refreshers and not self._closed:
            self._refreshers[key] = asyncio.get_running_loop().create_task(self._refresh_loop(key))
        return token

    async def _refresh_loop(self, key: K) -> None:
        try:
            while True:
                entry = self._entries.get(key)
                if entry is None or entry.token is None:
                    return
                deadline = max(entry.refresh_at, entry.retry_at if entry.failures else 0.0)
                await self._clock.sleep_until(deadline)
                entry = self._entries.get(key)
                if entry is None or entry.token is None:
                    return
                if self._clock.wall() < max(entry.refresh_at, entry.retry_at if entry.failures else 0.0):
                    continue  # replaced by a newer token meanwhile
                if not entry.used and not self._keep_warm(key):
                    del self._entries[key]  # idle: let it go rather than refresh forever
                    self._publish()
                    return
                entry.used = False
                await self._refresh_once(key)
        finally:
            self._refreshers.pop(key, None)

    async def _refresh_once(self, key: K) -> None:
        task = self._inflight.get(key) or self._start_load(key)
        outcome: metrics.Outcome = metrics.Outcome.OK
        error: BrokerError | None = None
        try:
            await asyncio.shield(task)
        except Denied as exc:
            outcome, error = metrics.Outcome.DENIED, exc
            self._entries.pop(key, None)
            self._publish()
        except BrokerError as exc:
            outcome, error = metrics.Outcome.TRANSIENT, exc
        metrics.REFRESHES.labels(kind=self._kind.value, outcome=outcome.value).inc()
        extra = {"event": "refresh", "kind": self._kind.value, "outcome": outcome.value}
        if error is None:
            log.info("token refreshed", extra=extra)
        elif outcome is metrics.Outcome.DENIED:
            log.error("refresh denied; token evicted", extra={**extra, "error": error.describe()})
        else:
            message = "refresh failed; serving the cached token while it is valid"
            log.warning(message, extra={**extra, "error": error.describe()})

    async def refresh_due(self) -> int:
        """Refresh now every wanted token that is inside its refresh window; return how many.

        For hosts that freeze the process between requests (AWS Lambda, SPEC §10):
        the background timers above only run while the process does, so after a
        thaw the host calls this before its clients ask. A key still backing off
        after a failure waits for its retry time, as the refresh loop would.
        """
        now = self._clock.wall()
        due = [
            key
            for key, entry in self._entries.items()
            if entry.token is not None
            and now >= entry.refresh_at
            and (entry.used or self._keep_warm(key))
            and not (entry.failures and now < entry.retry_at)
        ]
        for key in due:
            self._entries[key].used = False  # as the refresh loop does: idle keys lapse
        await asyncio.gather(*(self._refresh_once(key) for key in due))
        return len(due)

    # -- bookkeeping -------------------------------------------------------------

    def _count(self, result: metrics.CacheResult) -> None:
        self._lookups[result].value += 1

    def _publish(self) -> None:
        held = sum(1 for e in self._entries.values() if e.token)
        metrics.CACHED_TOKENS.labels(kind=self._kind.value).set(held)

    def abort_loads(self) -> None:
        """Fail every running load with a Transient error (drain after SIGTERM)."""
        self._aborting = True
        for task in list(self._inflight.values()):
            task.cancel()

    async def close(self) -> None:
        """Cancel and await every task this cache owns."""
        self._closed = True
        tasks = [*self._refreshers.values(), *self._inflight.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, BrokerError):
                await task


def _consume(task: asyncio.Task[Token]) -> None:
    if not task.cancelled():
        task.exception()

"""The token chain: subject token → STS → (impersonation) over three caches.

The only thing request handlers, readiness and ``check`` talk to. The federated
token is cached once and shared by every scope set and ID-token audience; with
impersonation STS is always asked for ``cloud-platform`` (as golang/oauth2 does)
and the caller's scopes go to generateAccessToken only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref

import aiohttp

from broker import metrics
from broker.cache import Policy, TokenBucket, TokenCache
from broker.clock import Clock
from broker.diagnosis import NO_SERVICE_ACCOUNT_FIX
from broker.errors import BrokerError, NotFound, Step
from broker.settings import Settings
from broker.sources import SubjectTokenSource
from broker.steps import ChainSteps
from broker.tokens import CLOUD_PLATFORM, FederatedKey, IdTokenKey, ScopeSet, Token

log = logging.getLogger("broker.chain")
STS_SCOPES = ScopeSet.of([CLOUD_PLATFORM])
WARM_RETRY_CAP = 30.0  # SPEC §8: the pre-warm tries again at most this many seconds apart


class TokenChain:
    def __init__(
        self,
        settings: Settings,
        source: SubjectTokenSource,
        session: aiohttp.ClientSession,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.steps = ChainSteps(settings, source, session, clock)
        self._ready_once = False  # readiness latches after the first servable default token
        self._warming = False
        self._degraded_logged = False
        policy = Policy(refresh_before=settings.refresh_before, min_serve_ttl=settings.min_serve_ttl)
        # One budget for every miss that reaches IAM (or STS without impersonation): scope
        # sets and audiences alike, so varying either buys a caller nothing.
        bucket = TokenBucket(settings.upstream_rate, 2 * settings.upstream_rate, clock)
        self._federated = TokenCache[FederatedKey](
            metrics.Kind.FEDERATED, Step.STS, self._load_federated, clock, policy, keep_warm=lambda k: True
        )
        access_step = Step.IAM_ACCESS if settings.impersonating else Step.STS
        self._access = TokenCache[ScopeSet](
            metrics.Kind.ACCESS,
            access_step,
            self._load_access,
            clock,
            policy,
            keep_warm=lambda scopes: scopes == settings.scopes,
            max_entries=settings.max_scope_sets,
            bucket=bucket,
        )
        self._id = TokenCache[IdTokenKey](
            metrics.Kind.ID,
            Step.IAM_ID,
            self._load_id,
            clock,
            policy,
            max_entries=settings.max_audiences,
            bucket=bucket,
        )
        ref = weakref.ref(self)
        metrics.DEFAULT_SERVABLE.set_function(
            lambda: 1.0 if (c := ref()) and c._access.servable(c.settings.scopes) else 0.0
        )

    # -- what handlers call --------------------------------------------------------

    def cached_access_token(self, scopes: ScopeSet) -> Token | None:
        """A servable cached token without awaiting, or None (then call access_token)."""
        return self._access.hit(scopes or self.settings.scopes)

    async def access_token(self, scopes: ScopeSet) -> Token:
        return await self._access.get(scopes or self.settings.scopes)

    async def id_token(self, key: IdTokenKey) -> Token:
        if not self.settings.impersonating:
            raise NotFound(
                Step.IAM_ID,
                "ID tokens need a service account to impersonate; this broker uses direct federated access",
                fix=NO_SERVICE_ACCOUNT_FIX,
            )
        return await self._id.get(key)

    async def warm(self) -> None:
        """Mint the default access token so /readyz turns green before apps start.

        Retries until it succeeds (SPEC §8): while a pod's network comes up STS is
        often unreachable, and no client can ask for a token before the sidecar is
        ready, so a single attempt could leave it unready until the kubelet kills it.
        Wakes when the cache allows the next upstream call (its capped backoff, or an
        upstream's Retry-After), and at least every WARM_RETRY_CAP seconds."""
        default = self.settings.scopes
        self._warming = True
        rng = random.Random()
        failures = 0
        try:
            while True:
                # With impersonation the federated token is fetched first, on its own: an
                # access load that only replays the federated cache's error would double the
                # access key's backoff too, and two stacked backoffs exceed the cap.
                failing: TokenCache[FederatedKey] | TokenCache[ScopeSet] = self._federated
                try:
                    if self.settings.impersonating:
                        await self._federated.get(FederatedKey(STS_SCOPES))
                    failing = self._access
                    await self._access.get(default)
                except BrokerError as exc:
                    failures += 1
                    now = self._clock.wall()
                    retry_at = (
                        self._federated.retry_at(FederatedKey(STS_SCOPES))
                        if failing is self._federated
                        else self._access.retry_at(default)
                    )
                    if retry_at <= now:  # e.g. an error nothing recorded: own capped backoff
                        backoff = min(WARM_RETRY_CAP, 2.0 ** min(failures - 1, 8))
                        retry_at = now + backoff * rng.uniform(0.5, 1)
                    retry_at = min(retry_at, now + WARM_RETRY_CAP)
                    log.error(
                        "pre-warm failed; retrying",
                        extra={
                            "event": "prewarm",
                            "attempt": failures,
                            "retry_in": round(retry_at - now, 1),
                            "error": exc.describe(),
                        },
                    )
                    await self._clock.sleep_until(retry_at)
                    continue
                self._ready_once = True
                if failures:
                    log.info("pre-warm succeeded", extra={"event": "prewarm", "attempt": failures + 1})
                return
        finally:
            self._warming = False

    async def refresh_due(self) -> int:
        """Refresh every cached token inside its refresh window now (see TokenCache.refresh_due).

        The federated token goes first: the access and ID loaders build on it.
        """
        federated = await self._federated.refresh_due()
        access, ids = await asyncio.gather(self._access.refresh_due(), self._id.refresh_due())
        return federated + access + ids

    def readiness(self) -> tuple[bool, str]:
        default = self.settings.scopes
        if self._access.servable(default):
            self._ready_once = True
            self._degraded_logged = False
            return True, "default access token is cached and servable"
        # The pre-warm asks for the federated token on its own first, so its error may be
        # the only one recorded.
        error = self._access.last_error(default) or self._federated.last_error(FederatedKey(STS_SCOPES))
        reason = error.describe() if error else "default access token not minted yet"
        if not self._ready_once:
            return False, reason
        # Latched (SPEC §8): once ready, an upstream outage is a metric and a log line,
        # not a failed probe that makes Kubernetes or ECS restart the sidecar and add load
        # to the outage. Unready again only when nothing is servable and nothing retries.
        retrying = self._warming or self._access.busy(default)
        if retrying or self._access.any_servable() or self._id.any_servable():
            if not self._degraded_logged:
                self._degraded_logged = True
                log.warning(
                    "default token not servable; staying ready while the refresh retries",
                    extra={"event": "degraded", "error": reason},
                )
            # The error stays in the log: a probe body reaches whoever can reach the port.
            return True, "degraded: the default token is being retried"
        return False, reason

    def abort_loads(self) -> None:
        """Fail every running upstream load with a 503 (the drain deadline passed)."""
        for cache in (self._access, self._id, self._federated):
            cache.abort_loads()

    async def close(self) -> None:
        for cache in (self._access, self._id, self._federated):
            await cache.close()

    def default_token_error(self) -> BrokerError | None:
        """The last failure minting the default access token (admin /readyz names its step).

        The pre-warm asks for the federated token on its own first, so its error may be
        the only one recorded."""
        return self._access.last_error(self.settings.scopes) or self._federated.last_error(
            FederatedKey(STS_SCOPES)
        )

    # -- loaders: the cached use of the chain's steps (broker/steps.py) ------------

    async def _exchange(self, scopes: ScopeSet) -> Token:
        return await self.steps.exchange(await self.steps.subject_token(), scopes)

    async def _load_federated(self, key: FederatedKey) -> Token:
        return await self._exchange(key.scopes)

    async def _load_access(self, scopes: ScopeSet) -> Token:
        if not self.settings.impersonating:
            return await self._exchange(scopes)
        federated = await self._federated.get(FederatedKey(STS_SCOPES))
        return await self.steps.access_token(federated, scopes)

    async def _load_id(self, key: IdTokenKey) -> Token:
        federated = await self._federated.get(FederatedKey(STS_SCOPES))
        return await self.steps.id_token(federated, key.audience, key.include_email)

"""The token chain: subject token → STS → (impersonation) over three caches.

The only thing request handlers, readiness and ``check`` talk to. The federated
token is cached once and shared by every scope set and ID-token audience; with
impersonation STS is always asked for ``cloud-platform`` (as golang/oauth2 does)
and the caller's scopes go to generateAccessToken only.
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

from broker import diagnosis, iam, logs, metrics, sts
from broker.cache import Policy, TokenBucket, TokenCache
from broker.clock import Clock
from broker.errors import BrokerError, Denied, Step, Transient
from broker.settings import Settings
from broker.sources import SubjectTokenSource
from broker.tokens import CLOUD_PLATFORM, FederatedKey, IdTokenKey, ScopeSet, Token

T = TypeVar("T")
log = logging.getLogger("broker.chain")
STS_SCOPES = ScopeSet.of([CLOUD_PLATFORM])
UPSTREAM_OF_STEP = {
    Step.SUBJECT_TOKEN: metrics.Upstream.SUBJECT_TOKEN,
    Step.STS: metrics.Upstream.STS,
    Step.IAM_ACCESS: metrics.Upstream.IAM,
    Step.IAM_ID: metrics.Upstream.IAM,
    Step.AWS: metrics.Upstream.AWS,
    Step.AZURE: metrics.Upstream.AZURE,
}
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
        self._source = source
        self._session = session
        self._clock = clock
        self._context = diagnosis.Context(settings.cred.audience, settings.service_account_email)
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
            raise Denied(
                Step.IAM_ID,
                "ID tokens need a service account to impersonate; this broker uses direct federated access",
                fix="set service-account (or service_account_impersonation_url in the credential file)",
                upstream_status=404,
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
            return True, f"degraded, retrying: {reason}"
        return False, reason

    def abort_loads(self) -> None:
        """Fail every running upstream load with a 503 (the drain deadline passed)."""
        for cache in (self._access, self._id, self._federated):
            cache.abort_loads()

    async def close(self) -> None:
        for cache in (self._access, self._id, self._federated):
            await cache.close()

    # -- loaders -------------------------------------------------------------------

    async def _subject_token(self) -> str:
        subject = await self._timed(Step.SUBJECT_TOKEN, self._source.subject_token)
        logs.remember_subject_token(subject)
        return subject

    async def _exchange(self, scopes: ScopeSet) -> Token:
        subject = await self._subject_token()
        cred = self.settings.cred
        now = self._clock.wall()
        return await self._timed(
            Step.STS,
            lambda: sts.exchange_token(
                self._session,
                cred.token_url,
                audience=cred.audience,
                subject_token=subject,
                subject_token_type=cred.subject_token_type,
                scopes=scopes,
                now=now,
            ),
        )

    async def _load_federated(self, key: FederatedKey) -> Token:
        return await self._exchange(key.scopes)

    async def _load_access(self, scopes: ScopeSet) -> Token:
        if not self.settings.impersonating:
            return await self._exchange(scopes)
        federated = await self._federated.get(FederatedKey(STS_SCOPES))
        return await self._timed(
            Step.IAM_ACCESS,
            lambda: iam.generate_access_token(
                self._session,
                self.settings.access_token_url,
                bearer=federated.value,
                scopes=scopes,
                lifetime_seconds=self.settings.cred.token_lifetime_seconds,
                quota_project=self.settings.cred.quota_project_id,
            ),
        )

    async def _load_id(self, key: IdTokenKey) -> Token:
        federated = await self._federated.get(FederatedKey(STS_SCOPES))
        return await self._timed(
            Step.IAM_ID,
            lambda: iam.generate_id_token(
                self._session,
                self.settings.id_token_url,
                bearer=federated.value,
                audience=key.audience,
                include_email=key.include_email,
                quota_project=self.settings.cred.quota_project_id,
            ),
        )

    async def _timed(self, step: Step, call: Callable[[], Awaitable[T]]) -> T:
        upstream = UPSTREAM_OF_STEP[step].value
        started = time.perf_counter()
        outcome = metrics.Outcome.OK
        try:
            result = await call()
            if isinstance(result, Token):
                # Exact-value redaction catches what no pattern can (opaque tokens).
                logs.remember_secret(result.value)
            return result
        except Denied as exc:
            outcome = metrics.Outcome.DENIED
            explained = diagnosis.explain(exc, self._context)
            log.error("upstream denied", extra=_failure(step, explained))
            raise explained from None
        except Transient as exc:
            outcome = metrics.Outcome.TRANSIENT
            explained = diagnosis.explain(exc, self._context)
            log.warning("upstream failed", extra=_failure(step, explained))
            raise explained from None
        finally:
            metrics.UPSTREAM_CALLS.labels(upstream=upstream, outcome=outcome.value).inc()
            metrics.UPSTREAM_SECONDS.labels(upstream=upstream).observe(time.perf_counter() - started)


def _failure(step: Step, exc: BrokerError) -> dict[str, object]:
    return {
        "event": "upstream_failure",
        "step": step.value,
        "upstream_status": exc.upstream_status,
        "error": exc.describe(),
    }

"""The token chain: subject token → STS → (impersonation) over three caches.

The only thing request handlers, readiness and ``check`` talk to. The federated
token is cached once and shared by every scope set and ID-token audience; with
impersonation STS is always asked for ``cloud-platform`` (as golang/oauth2 does)
and the caller's scopes go to generateAccessToken only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

from broker import diagnosis, iam, logs, metrics, sts
from broker.cache import Policy, TokenCache
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
        policy = Policy(refresh_before=settings.refresh_before, min_serve_ttl=settings.min_serve_ttl)
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
        )
        self._id = TokenCache[IdTokenKey](metrics.Kind.ID, Step.IAM_ID, self._load_id, clock, policy)

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
        """Mint the default access token so /readyz turns green before apps start."""
        try:
            await self.access_token(self.settings.scopes)
        except BrokerError as exc:
            log.error("pre-warm failed", extra={"event": "prewarm", "error": exc.describe()})

    def readiness(self) -> tuple[bool, str]:
        if self._access.servable(self.settings.scopes):
            return True, "default access token is cached and servable"
        error = self._access.last_error(self.settings.scopes)
        return False, error.describe() if error else "default access token not minted yet"

    async def close(self) -> None:
        for cache in (self._access, self._id, self._federated):
            await cache.close()

    def default_token_error(self) -> BrokerError | None:
        """The last failure minting the default access token (admin /readyz names its step)."""
        return self._access.last_error(self.settings.scopes)

    # -- loaders -------------------------------------------------------------------

    async def _subject_token(self) -> str:
        subject = await self._timed(Step.SUBJECT_TOKEN, self._source.subject_token)
        logs.remember_secret(subject)
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
        except Exception as exc:
            # A bug or a library's surprise (e.g. a header value aiohttp refuses) is
            # a transient failure of this step, served as 503 naming it, never a 500.
            # The class only: the message may quote a token or a response body.
            outcome = metrics.Outcome.TRANSIENT
            unexpected = Transient(step, f"unexpected error ({type(exc).__name__})")
            log.error("upstream step raised unexpectedly", extra=_failure(step, unexpected))
            raise unexpected from None
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

"""The token chain: subject token → STS → (impersonation) over three caches.

The only thing request handlers, readiness and ``check`` talk to. The federated
token is cached once and shared by every scope set and ID-token audience; with
impersonation STS is always asked for ``cloud-platform`` (as golang/oauth2 does)
and the caller's scopes go to generateAccessToken only.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from broker import metrics
from broker.cache import Policy, TokenCache
from broker.clock import Clock
from broker.diagnosis import NO_SERVICE_ACCOUNT_FIX
from broker.errors import BrokerError, NotFound, Step
from broker.settings import Settings
from broker.sources import SubjectTokenSource
from broker.steps import ChainSteps
from broker.tokens import CLOUD_PLATFORM, FederatedKey, IdTokenKey, ScopeSet, Token

log = logging.getLogger("broker.chain")
STS_SCOPES = ScopeSet.of([CLOUD_PLATFORM])


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
            raise NotFound(
                Step.IAM_ID,
                "ID tokens need a service account to impersonate; this broker uses direct federated access",
                fix=NO_SERVICE_ACCOUNT_FIX,
            )
        return await self._id.get(key)

    async def warm(self) -> None:
        """Mint the default access token so /readyz turns green before apps start."""
        try:
            await self.access_token(self.settings.scopes)
        except BrokerError as exc:
            log.error("pre-warm failed", extra={"event": "prewarm", "error": exc.describe()})

    async def refresh_due(self) -> int:
        """Refresh every cached token inside its refresh window now (see TokenCache.refresh_due).

        The federated token goes first: the access and ID loaders build on it.
        """
        federated = await self._federated.refresh_due()
        access, ids = await asyncio.gather(self._access.refresh_due(), self._id.refresh_due())
        return federated + access + ids

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

"""The chain's steps, uncached: subject token → STS → generateAccessToken / generateIdToken.

The one code path (SPEC §11): ``TokenChain``'s cached loaders and ``wif-broker
check`` both call these, so what ``check`` proves is what ``run`` does. Each
upstream call is timed and counted here, once, and every failure leaves here
explained by ``diagnosis`` (the 403/503 body, the log line and ``check`` print
the same fix).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import aiohttp

from broker import diagnosis, iam, logs, metrics, sts
from broker.clock import Clock
from broker.credconfig import AWS_TOKEN_TYPE, UrlSource
from broker.errors import BrokerError, Denied, Step, Transient
from broker.settings import Settings
from broker.sources import SubjectTokenSource
from broker.tokens import ScopeSet, Token, unverified_claims

T = TypeVar("T")
log = logging.getLogger("broker.chain")
UPSTREAM_OF_STEP = {
    Step.SUBJECT_TOKEN: metrics.Upstream.SUBJECT_TOKEN,
    Step.STS: metrics.Upstream.STS,
    Step.IAM_ACCESS: metrics.Upstream.IAM,
    Step.IAM_ID: metrics.Upstream.IAM,
    Step.AWS: metrics.Upstream.AWS,
    Step.AZURE: metrics.Upstream.AZURE,
}
# The subject-token call of these sources *is* the call to their cloud: label it so.
_UPSTREAM_OF_SOURCE = {"aws": metrics.Upstream.AWS, "azure": metrics.Upstream.AZURE}


def subject_of(token: str) -> diagnosis.Subject:
    """The claims of a JWT subject token that fixes quote; empty for anything else."""
    try:
        claims = unverified_claims(token)
    except ValueError:
        return diagnosis.Subject()
    aud = claims.get("aud")
    return diagnosis.Subject(
        iss=str(claims.get("iss", "")),
        sub=str(claims.get("sub", "")),
        aud=",".join(map(str, aud)) if isinstance(aud, list) else str(aud or ""),
        iat=float(claims["iat"]) if isinstance(claims.get("iat"), int | float) else None,
        exp=float(claims["exp"]) if isinstance(claims.get("exp"), int | float) else None,
    )


class ChainSteps:
    """One uncached call per step, timed and explained."""

    def __init__(
        self,
        settings: Settings,
        source: SubjectTokenSource,
        session: aiohttp.ClientSession,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.source = source
        self._session = session
        self._clock = clock
        cred = settings.cred
        self._context = diagnosis.Context(
            cred.audience,
            settings.service_account_email,
            aws=cred.subject_token_type == AWS_TOKEN_TYPE,
            source_url=cred.source.url if isinstance(cred.source, UrlSource) else "",
        )

    def learn_member(self, member: str) -> None:
        """The narrowest member, when something other than the subject token knows it (AWS role)."""
        self._context = replace(self._context, member=member)

    async def subject_token(self) -> str:
        upstream = _UPSTREAM_OF_SOURCE.get(self.source.kind, metrics.Upstream.SUBJECT_TOKEN)
        subject = await self._timed(Step.SUBJECT_TOKEN, self.source.subject_token, upstream)
        logs.remember_subject_token(subject)
        # Kept for the fixes of later steps: a refused exchange quotes the token's
        # claims, and an IAM denial after a cached exchange still names this subject.
        self._context = replace(self._context, subject=subject_of(subject))
        return subject

    async def exchange(self, subject: str, scopes: ScopeSet) -> Token:
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

    async def access_token(self, federated: Token, scopes: ScopeSet) -> Token:
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

    async def id_token(self, federated: Token, audience: str, include_email: bool) -> Token:
        return await self._timed(
            Step.IAM_ID,
            lambda: iam.generate_id_token(
                self._session,
                self.settings.id_token_url,
                bearer=federated.value,
                audience=audience,
                include_email=include_email,
                quota_project=self.settings.cred.quota_project_id,
            ),
        )

    def explain(self, exc: BrokerError) -> BrokerError:
        return diagnosis.explain(exc, replace(self._context, now=self._clock.wall()))

    async def _timed(
        self, step: Step, call: Callable[[], Awaitable[T]], upstream: metrics.Upstream | None = None
    ) -> T:
        label = (upstream or UPSTREAM_OF_STEP[step]).value
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
            explained = self.explain(exc)
            log.error("upstream denied", extra=_failure(step, explained))
            raise explained from None
        except Transient as exc:
            outcome = metrics.Outcome.TRANSIENT
            explained = self.explain(exc)
            log.warning("upstream failed", extra=_failure(step, explained))
            raise explained from None
        except BrokerError:
            raise
        except Exception as exc:
            # A bug or a library's surprise (e.g. a header value aiohttp refuses) is
            # a transient failure of this step, served as 503 naming it, never a 500.
            # The class only: the message may quote a token or a response body.
            outcome = metrics.Outcome.TRANSIENT
            unexpected = Transient(step, f"unexpected error ({type(exc).__name__})")
            log.error("upstream step raised unexpectedly", extra=_failure(step, unexpected))
            raise unexpected from None
        finally:
            metrics.UPSTREAM_CALLS.labels(upstream=label, outcome=outcome.value).inc()
            metrics.UPSTREAM_SECONDS.labels(upstream=label).observe(time.perf_counter() - started)


def _failure(step: Step, exc: BrokerError) -> dict[str, object]:
    return {
        "event": "upstream_failure",
        "step": step.value,
        "upstream_status": exc.upstream_status,
        "error": exc.describe(),
    }

"""``wif-broker check``: the chain once, step by step, with what each step saw.

Prints claims, principals and expiries, never a token. On failure it prints the
step, the upstream's reason and the likely fix, and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broker import diagnosis, httpclient, iam, logs, sts
from broker.chain import STS_SCOPES
from broker.clock import SystemClock
from broker.errors import BrokerError
from broker.settings import Settings
from broker.sources import build_source
from broker.tokens import Token, unverified_claims

T = TypeVar("T")
CHECK_AUDIENCE = "https://wif-broker.check.invalid"
_CLOCK = SystemClock()


def _say(line: str) -> None:
    print(logs.redact(line), file=sys.stdout, flush=True)


async def _step(ctx: diagnosis.Context, name: str, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except BrokerError as raw:
        exc = diagnosis.explain(raw, ctx)
        _say(
            f"FAIL  {name}: {exc.reason}" + (f" (HTTP {exc.upstream_status})" if exc.upstream_status else "")
        )
        if exc.fix:
            _say(f"      fix: {exc.fix}")
        raise


def _expiry(token: Token) -> str:
    return f"expires in {int(token.expires_at - _CLOCK.wall())}s"


async def run_check(settings: Settings) -> int:
    cred = settings.cred
    _say(f"audience      {cred.audience}")
    _say(f"account       {settings.email}" + ("" if settings.impersonating else " (direct federated access)"))
    ctx = diagnosis.Context(cred.audience, settings.service_account_email)
    closers: list[Callable[[], Awaitable[None]]] = []
    session = httpclient.new_session()
    try:
        source = build_source(cred, session, aws_strict=settings.aws_strict)
        closers.append(source.close)
        seen = await _step(ctx, "native identity", source.describe)
        _say(
            f"ok    native identity ({source.kind}): "
            + " ".join(f"{k}={v}" for k, v in seen.items() if k != "bind")
        )
        if "bind" in seen:
            _say(f"      bind roles/iam.workloadIdentityUser to: {seen['bind']}")
        subject = await _step(ctx, "subject token", source.subject_token)
        _say(f"ok    subject token ({source.kind}) obtained")
        scopes = STS_SCOPES if settings.impersonating else settings.scopes
        federated = await _step(
            ctx,
            "STS token exchange",
            lambda: sts.exchange_token(
                session,
                cred.token_url,
                audience=cred.audience,
                subject_token=subject,
                subject_token_type=cred.subject_token_type,
                scopes=scopes,
                now=_CLOCK.wall(),
            ),
        )
        _say(f"ok    STS token exchange at {cred.token_url}: federated token {_expiry(federated)}")
        if not settings.impersonating:
            _say("skip  impersonation: no service account configured; ID tokens unavailable")
            return 0
        access = await _step(
            ctx,
            "generateAccessToken",
            lambda: iam.generate_access_token(
                session,
                settings.access_token_url,
                bearer=federated.value,
                scopes=settings.scopes,
                lifetime_seconds=cred.token_lifetime_seconds,
                quota_project=cred.quota_project_id,
            ),
        )
        _say(f"ok    generateAccessToken for {settings.email}: access token {_expiry(access)}")
        id_token = await _step(
            ctx,
            "generateIdToken",
            lambda: iam.generate_id_token(
                session,
                settings.id_token_url,
                bearer=federated.value,
                audience=CHECK_AUDIENCE,
                include_email=True,
                quota_project=cred.quota_project_id,
            ),
        )
        claims = unverified_claims(id_token.value)
        _say(
            f"ok    generateIdToken: aud={claims.get('aud')} email={claims.get('email')} {_expiry(id_token)}"
        )
        return 0
    except BrokerError:
        return 1
    finally:
        for close in closers:
            await close()
        await session.close()

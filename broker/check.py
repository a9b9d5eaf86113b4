"""``wif-broker check``: the chain's own steps once, uncached, with what each step saw.

One line per step (``ok``/``FAIL``/``skip``); after a FAIL line come the facts
and the fix, one command per line. It runs :class:`broker.steps.ChainSteps`, the
functions ``run``'s caches call, so it proves what ``run`` does. It prints
claims, principals, members and ISO-8601 UTC expiries, never a token. Exit 0
only when every step passed, 1 otherwise (configuration errors exit 2 in cli).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broker import diagnosis, httpclient, logs
from broker.chain import STS_SCOPES
from broker.clock import SystemClock
from broker.credconfig import UrlSource
from broker.errors import BrokerError
from broker.settings import Settings
from broker.sources import build_source
from broker.steps import ChainSteps
from broker.tokens import Token, unverified_claims

T = TypeVar("T")
CHECK_AUDIENCE = "https://wif-broker.check.invalid"
_CLOCK = SystemClock()
_INDENT = "      "


def _say(line: str) -> None:
    print(logs.redact(line), file=sys.stdout, flush=True)


def _say_lines(first: str, text: str) -> None:
    lines = text.splitlines()
    if lines:
        _say(f"{_INDENT}{first}{lines[0]}")
    for line in lines[1:]:
        _say(f"{_INDENT}{line}")


async def _step(steps: ChainSteps, name: str, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except BrokerError as raw:
        # Errors from the steps are explained already; describe() runs outside them.
        exc = raw if raw.fix else steps.explain(raw)
        status = f" (HTTP {exc.upstream_status})" if exc.upstream_status else ""
        _say(f"FAIL  {name}: {exc.reason}{status}")
        _say_lines("fix: ", exc.fix)
        raise


def _expiry(token: Token) -> str:
    return f"expires {diagnosis.iso(token.expires_at)} (in {int(token.expires_at - _CLOCK.wall())}s)"


async def run_check(settings: Settings) -> int:
    cred = settings.cred
    _say(f"audience      {cred.audience}")
    _say(f"account       {settings.email}" + ("" if settings.impersonating else " (direct federated access)"))
    closers: list[Callable[[], Awaitable[None]]] = []
    session = httpclient.new_session()
    try:
        source = build_source(cred, session, aws_strict=settings.aws_strict)
        closers.append(source.close)
        steps = ChainSteps(settings, source, session, _CLOCK)
        if isinstance(cred.source, UrlSource):
            for header, value in cred.source.headers:
                if header.lower() == "metadata" and value != "true":
                    _say(f"warn  credential file: credential_source.headers has 'Metadata: {value}'")
                    _say_lines("fix: ", diagnosis.metadata_header(value))
        seen = await _step(steps, "native identity", source.describe)
        _say(
            f"ok    native identity ({source.kind}): "
            + " ".join(f"{k}={v}" for k, v in seen.items() if k != "bind")
        )
        member = seen.get("bind") or (
            diagnosis.subject_member(cred.audience, seen["sub"]) if seen.get("sub") else ""
        )
        if member:
            steps.learn_member(member)
            _say(f"{_INDENT}bind {diagnosis.WORKLOAD_IDENTITY_USER} to: {member}")
        subject = await _step(steps, "subject token", steps.subject_token)
        _say(f"ok    subject token ({source.kind}) obtained")
        scopes = STS_SCOPES if settings.impersonating else settings.scopes
        federated = await _step(steps, "STS token exchange", lambda: steps.exchange(subject, scopes))
        _say(f"ok    STS token exchange at {cred.token_url}: federated token {_expiry(federated)}")
        if not settings.impersonating:
            _say("skip  impersonation: no service account configured; ID tokens unavailable")
            return 0
        access = await _step(
            steps, "generateAccessToken", lambda: steps.access_token(federated, settings.scopes)
        )
        _say(f"ok    generateAccessToken for {settings.email}: access token {_expiry(access)}")
        id_token = await _step(
            steps, "generateIdToken", lambda: steps.id_token(federated, CHECK_AUDIENCE, True)
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

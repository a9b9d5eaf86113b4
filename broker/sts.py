"""Google STS token exchange (reference/token-chain.md §A). Stateless."""

from __future__ import annotations

import aiohttp

from broker import httpclient
from broker.errors import Step, Transient
from broker.tokens import ScopeSet, Token, TokenKind, header_safe

MAX_EXPIRES_IN = 7 * 24 * 3600  # STS issues ~1 h tokens; anything beyond a week is garbage
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
# Fix text for STS's errors lives in broker/diagnosis.py, with the facts it needs.


async def exchange_token(
    session: aiohttp.ClientSession,
    url: str,
    *,
    audience: str,
    subject_token: str,
    subject_token_type: str,
    scopes: ScopeSet,
    now: float,
) -> Token:
    """Exchange a subject token for a federated access token.

    ``now`` is taken before the request, as google-auth does, so the computed
    expiry errs on the early side.
    """
    form = {
        "grant_type": GRANT_TYPE,
        "audience": audience,
        "scope": " ".join(scopes.scopes),
        "requested_token_type": ACCESS_TOKEN_TYPE,
        "subject_token": subject_token,
        "subject_token_type": subject_token_type,
    }
    reply = await httpclient.request(session, "POST", url, Step.STS, data=form)
    if reply.status != 200:
        raise httpclient.upstream_error(Step.STS, reply)
    try:
        data = reply.json()
        value = data["access_token"]
        # google-auth tolerates a string here, so must we.
        expires_in = int(data["expires_in"])
        if expires_in > MAX_EXPIRES_IN:  # absurd values would overflow the expiry arithmetic
            raise ValueError(expires_in)
    except (ValueError, KeyError, TypeError, OverflowError):
        raise Transient(Step.STS, "response is not a token JSON object", upstream_status=200) from None
    if not isinstance(value, str) or not value:
        raise Transient(Step.STS, "response has an empty access_token", upstream_status=200)
    if not header_safe(value):
        # Never the value: it is the token (or what pretends to be one).
        raise Transient(
            Step.STS, "response access_token has characters a header value cannot carry", upstream_status=200
        )
    if expires_in <= 0:
        raise Transient(Step.STS, f"response has invalid expires_in {expires_in}", upstream_status=200)
    return Token(TokenKind.FEDERATED, value, now + expires_in)

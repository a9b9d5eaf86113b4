"""IAM Credentials generateAccessToken / generateIdToken (token-chain.md §B). Stateless."""

from __future__ import annotations

from datetime import datetime

import aiohttp

from broker import httpclient, tokens
from broker.errors import BrokerError, Step, Transient
from broker.tokens import ScopeSet, Token, TokenKind, header_safe


def _error(step: Step, reply: httpclient.Reply) -> BrokerError:
    """The upstream error with the ErrorInfo facts attached (token-chain.md §B.3).

    IAM answers a missing binding and a disabled API with the same 403
    PERMISSION_DENIED; only ``details[].reason`` (IAM_PERMISSION_DENIED vs
    SERVICE_DISABLED) and its metadata (permission, consumer) tell them apart.
    """
    error = httpclient.upstream_error(step, reply)
    details = _error_info(reply)
    if not details:
        return error
    return type(error)(
        error.step,
        error.reason,
        upstream_status=error.upstream_status,
        retry_after=error.retry_after,
        code=error.code,
        details=details,
    )


def _error_info(reply: httpclient.Reply) -> tuple[tuple[str, str], ...]:
    try:
        data = reply.json()
    except ValueError:
        return ()
    err = data.get("error") if isinstance(data, dict) else None
    found: list[tuple[str, str]] = []
    for detail in (err.get("details") or []) if isinstance(err, dict) else []:
        if not isinstance(detail, dict) or not str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo"):
            continue
        found.append(("reason", str(detail.get("reason", ""))))
        metadata = detail.get("metadata")
        if isinstance(metadata, dict):
            found.extend((str(k), str(v)) for k, v in metadata.items() if isinstance(v, str))
        break  # Google sends one ErrorInfo; the first is the one that classifies
    return tuple(found)


def _headers(bearer: str, quota_project: str) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {bearer}"}
    if quota_project:
        headers["x-goog-user-project"] = quota_project
    return headers


async def generate_access_token(
    session: aiohttp.ClientSession,
    url: str,
    *,
    bearer: str,
    scopes: ScopeSet,
    lifetime_seconds: int,
    quota_project: str,
) -> Token:
    body = {"delegates": None, "scope": list(scopes.scopes), "lifetime": f"{lifetime_seconds}s"}
    reply = await httpclient.request(
        session, "POST", url, Step.IAM_ACCESS, headers=_headers(bearer, quota_project), json_body=body
    )
    if reply.status != 200:
        raise _error(Step.IAM_ACCESS, reply)
    try:
        data = reply.json()
        value = data["accessToken"]
        expires_at = _parse_rfc3339(data["expireTime"])
    except (ValueError, KeyError, TypeError):
        raise Transient(
            Step.IAM_ACCESS, "response is not an access token object", upstream_status=200
        ) from None
    if not isinstance(value, str) or not value:
        raise Transient(Step.IAM_ACCESS, "response has an empty accessToken", upstream_status=200)
    if not header_safe(value):
        raise Transient(
            Step.IAM_ACCESS,
            "response accessToken has characters a header value cannot carry",
            upstream_status=200,
        )
    return Token(TokenKind.ACCESS, value, expires_at)


async def generate_id_token(
    session: aiohttp.ClientSession,
    url: str,
    *,
    bearer: str,
    audience: str,
    include_email: bool,
    quota_project: str,
) -> Token:
    body = {"audience": audience, "delegates": None, "includeEmail": include_email}
    reply = await httpclient.request(
        session, "POST", url, Step.IAM_ID, headers=_headers(bearer, quota_project), json_body=body
    )
    if reply.status != 200:
        raise _error(Step.IAM_ID, reply)
    try:
        value = reply.json()["token"]
        if isinstance(value, str) and not header_safe(value):
            raise Transient(
                Step.IAM_ID, "response token has characters a header value cannot carry", upstream_status=200
            )
        # No expiry field: read exp from the JWT, unverified, as google-auth does.
        claims = tokens.unverified_claims(value)
        expires_at = float(claims["exp"])
    except (ValueError, KeyError, TypeError):
        raise Transient(Step.IAM_ID, "response is not an ID token", upstream_status=200) from None
    return Token(TokenKind.ID, value, expires_at)


def _parse_rfc3339(text: object) -> float:
    # Real IAM sends "2020-08-11T07:55:22Z"; accept fractions and offsets too.
    if not isinstance(text, str):
        raise TypeError("expireTime is not a string")
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

"""IAM Credentials generateAccessToken / generateIdToken (token-chain.md §B). Stateless."""

from __future__ import annotations

from datetime import datetime

import aiohttp

from broker import httpclient, tokens
from broker.errors import Step, Transient
from broker.tokens import ScopeSet, Token, TokenKind, header_safe

FIXES = {
    "PERMISSION_DENIED": (
        "grant roles/iam.workloadIdentityUser on the service account to the federated principal, e.g. "
        "gcloud iam service-accounts add-iam-policy-binding SA_EMAIL --role=roles/iam.workloadIdentityUser "
        "--member='principalSet://iam.googleapis.com/projects/PROJECT_NUMBER/locations/global/"
        "workloadIdentityPools/POOL/*'"
    ),
    "NOT_FOUND": "the service account does not exist: check the email in the impersonation URL",
    "INVALID_ARGUMENT": "check token_lifetime_seconds (over 3600 needs an org policy exception)",
    "UNAUTHENTICATED": "the federated token was refused; it may have expired",
}


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
        raise httpclient.upstream_error(Step.IAM_ACCESS, reply, FIXES)
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
        raise httpclient.upstream_error(Step.IAM_ID, reply, FIXES)
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

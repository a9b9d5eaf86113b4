"""Strict fakes of Azure's token endpoints: IMDS managed identity and Entra ID's v2 token endpoint.

One ``FakeEntraTenant`` holds the apps (token audiences), identities and the two
Entra issuers (v1 ``https://sts.windows.net/TENANT/``, v2
``https://login.microsoftonline.com/TENANT/v2.0``); both services mint from it.
Shapes follow token-chain.md §E: IMDS answers only ``Metadata: true`` (exactly;
``True`` is a 400 ``bad_request_102``, as the real one answers today) and
serves every number as a JSON string; Entra ID validates the workload-identity
client assertion (signature by a trusted issuer, a federated credential with that
issuer, subject and audience ``api://AzureADTokenExchange``, expiry) and answers
errors with ``AADSTS`` codes in the real body shape.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from broker.fakes._service import FakeService, recorded
from broker.fakes.oidc import FakeOidcIssuer

TENANT_ID = "7e1d3f0a-0000-4000-a000-00000000a2f1"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
AKS_ISSUER = "https://eastus.oic.prod-aks.azure.com/" + TENANT_ID + "/0c5b7d2e-0000-4000-a000-00000000a45e/"


@dataclass(frozen=True)
class EntraApp:
    """An app registration whose token the Google provider accepts."""

    app_id_uri: str
    client_id: str  # v2 tokens carry this as aud
    token_version: int = 2  # the app's requestedAccessTokenVersion


@dataclass(frozen=True)
class FederatedCredential:
    issuer: str
    subject: str
    audience: str = FEDERATED_AUDIENCE


@dataclass(frozen=True)
class ManagedIdentity:
    client_id: str
    object_id: str  # the tokens' sub and oid
    federated: tuple[FederatedCredential, ...] = ()


DEFAULT_APP = EntraApp("api://wif-broker", "3c1f6a52-0000-4000-a000-0000000a99c1", 2)
SYSTEM_ASSIGNED = ManagedIdentity(
    "9b0e2d4c-0000-4000-a000-00000000c11d", "0f4a1b2c-0000-4000-a000-0000000005a1"
)
USER_ASSIGNED = ManagedIdentity(
    "5d8c7e61-0000-4000-a000-00000000c11e",
    "1e2d3c4b-0000-4000-a000-0000000005a2",
    (FederatedCredential(AKS_ISSUER, "system:serviceaccount:default:app"),),
)


class FakeEntraTenant:
    """Apps, identities, trusted external issuers and the tenant's two token issuers."""

    def __init__(
        self,
        tenant_id: str = TENANT_ID,
        *,
        apps: Iterable[EntraApp] = (DEFAULT_APP,),
        identities: Iterable[ManagedIdentity] = (SYSTEM_ASSIGNED, USER_ASSIGNED),
    ) -> None:
        self.tenant_id = tenant_id
        self.v1 = FakeOidcIssuer(f"https://sts.windows.net/{tenant_id}/", kid="fake-entra-v1")
        self.v2 = FakeOidcIssuer(f"https://login.microsoftonline.com/{tenant_id}/v2.0", kid="fake-entra-v2")
        self.apps = list(apps)
        self.identities = {identity.client_id: identity for identity in identities}
        self.trusted: dict[str, FakeOidcIssuer] = {}  # external issuers (AKS) by iss
        self.minted: list[str] = []

    def trust(self, issuer: FakeOidcIssuer) -> None:
        self.trusted[issuer.issuer] = issuer

    def app(self, resource: str) -> EntraApp | None:
        resource = resource.removesuffix("/.default")
        return next((a for a in self.apps if resource in (a.app_id_uri, a.client_id)), None)

    def issuer_of(self, app: EntraApp) -> FakeOidcIssuer:
        return self.v2 if app.token_version == 2 else self.v1

    def mint(self, identity: ManagedIdentity, app: EntraApp, resource: str, now: float, lifetime: int) -> str:
        claims: dict[str, Any] = {"tid": self.tenant_id, "oid": identity.object_id, "idtyp": "app"}
        claims["nbf"] = int(now)
        if app.token_version == 2:
            audience = app.client_id
            claims.update(azp=identity.client_id, azpacr="2", ver="2.0")
        else:
            audience = resource.removesuffix("/.default")
            claims.update(appid=identity.client_id, appidacr="2", ver="1.0")
        token = self.issuer_of(app).mint(audience, identity.object_id, lifetime, now=now, extra_claims=claims)
        self.minted.append(token)
        return token


def _claims_unverified(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError(f"expected 3 JWT segments, got {len(parts)}")
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the JWT payload is not base64url JSON ({exc})") from None
    if not isinstance(claims, dict):
        raise ValueError("the JWT payload is not an object")
    return claims


def oauth_error(status: int, error: str, aadsts: int | None, text: str) -> web.Response:
    if aadsts is None:
        return web.json_response({"error": error, "error_description": text}, status=status)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    trace = "00000000-0000-4000-a000-" + secrets.token_hex(6)
    return web.json_response(
        {
            "error": error,
            "error_description": f"AADSTS{aadsts}: {text} Trace ID: {trace} Correlation ID: {trace} "
            f"Timestamp: {stamp}",
            "error_codes": [aadsts],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": trace,
            "error_uri": f"https://login.microsoftonline.com/error?code={aadsts}",
        },
        status=status,
    )


class _Rejected(Exception):
    def __init__(self, status: int, error: str, aadsts: int, text: str) -> None:
        super().__init__(text)
        self.response = oauth_error(status, error, aadsts, text)


class FakeEntraId(FakeService):
    """``POST /{tenant}/oauth2/v2.0/token``: client credentials with a federated client assertion."""

    def __init__(
        self, tenant: FakeEntraTenant, *, lifetime_seconds: int = 3599, now: Callable[[], float] = time.time
    ) -> None:
        super().__init__(lifetime_seconds=lifetime_seconds, now=now)
        self.tenant = tenant

    def _add_routes(self, application: web.Application) -> None:
        application.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)

    async def _token(self, request: web.Request) -> web.Response:
        try:
            token = self._grant(request.match_info["tenant"], recorded(request).form or {})
        except _Rejected as exc:
            return exc.response
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": self.lifetime_seconds,
                "ext_expires_in": self.lifetime_seconds,
                "access_token": token,
            }
        )

    def _grant(self, tenant: str, form: dict[str, str]) -> str:
        if tenant != self.tenant.tenant_id:
            raise _Rejected(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            raise _Rejected(
                400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type."
            )
        if form.get("client_assertion_type") != JWT_BEARER or not form.get("client_assertion"):
            raise _Rejected(
                400,
                "invalid_client",
                7000216,
                "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' "
                "grant type.",
            )
        identity = self.tenant.identities.get(form.get("client_id", ""))
        if identity is None:
            raise _Rejected(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{form.get('client_id')}' was not found in the directory "
                f"'{self.tenant.tenant_id}'.",
            )
        self._check_assertion(identity, form["client_assertion"])
        scope = form.get("scope", "")
        app = self.tenant.app(scope) if scope.endswith("/.default") and " " not in scope else None
        if app is None:
            raise _Rejected(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {scope.removesuffix('/.default')} was not found in the tenant "
                f"named {self.tenant.tenant_id}.",
            )
        return self.tenant.mint(identity, app, scope, self.now(), self.lifetime_seconds)

    def _check_assertion(self, identity: ManagedIdentity, assertion: str) -> None:
        try:
            unverified = _claims_unverified(assertion)
        except ValueError as exc:
            raise _Rejected(
                400, "invalid_client", 50027, f"JWT token is invalid or malformed: {exc}."
            ) from None
        iss = str(unverified.get("iss", ""))
        records = [f for f in identity.federated if f.issuer == iss]
        issuer = self.tenant.trusted.get(iss)
        if not records or issuer is None:
            raise _Rejected(
                400,
                "invalid_client",
                700211,
                f"No matching federated identity record found for presented assertion issuer '{iss}'. "
                "Please check your federated identity credential Subject, Audience and Issuer against the "
                "presented assertion.",
            )
        now = self.now()
        try:
            claims = issuer.verify(assertion, now)
        except ValueError:
            raise _Rejected(
                401, "invalid_client", 700027, "Client assertion failed signature validation."
            ) from None
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= now:
            raise _Rejected(
                400,
                "invalid_client",
                700024,
                f"Client assertion is not within its valid time range. Current time: {int(now)}, expiry time "
                f"of assertion {exp}.",
            )
        aud, sub = claims.get("aud"), claims.get("sub")
        if not any(aud == f.audience or (isinstance(aud, list) and f.audience in aud) for f in records):
            raise _Rejected(
                400,
                "invalid_client",
                700212,
                f"No matching federated identity record found for presented assertion audience '{aud}'.",
            )
        if not any(sub == f.subject for f in records):
            raise _Rejected(
                400,
                "invalid_request",
                70021,
                "No matching federated identity record found for presented assertion. "
                f"Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{aud}'.",
            )

"""A strict fake of the IAM Service Account Credentials API.

Serves ``generateAccessToken`` and ``generateIdToken`` under
``/v1/projects/-/serviceAccounts/{EMAIL}:{method}``, authenticating callers with
tokens its FakeSts issued. Errors use the standard Google error body
(token-chain.md B.3) and the checks run in the order the real front end applies
them, so a broker bug surfaces as the same status it would meet in production.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from broker.fakes._service import (
    FakeService,
    error_info,
    google_error,
    is_json_type,
    media_type,
    recorded,
)
from broker.fakes.oidc import FakeGoogleSigner, FakeOidcIssuer
from broker.fakes.sts import FakeSts

IAM_SCOPES = frozenset(
    {"https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/iam"}
)
# method -> (IAM permission, RPC name, body fields the API knows)
_METHODS: dict[str, tuple[str, str, frozenset[str]]] = {
    "generateAccessToken": (
        "iam.serviceAccounts.getAccessToken",
        "GenerateAccessToken",
        frozenset({"delegates", "scope", "lifetime"}),
    ),
    "generateIdToken": (
        "iam.serviceAccounts.getOpenIdToken",
        "GenerateIdToken",
        frozenset({"delegates", "audience", "includeEmail"}),
    ),
}
DEFAULT_LIFETIME = 3600  # what the API grants when no lifetime is asked for
_LIFETIME = re.compile(r"^(\d+)s$")
_REALM = 'Bearer realm="https://accounts.google.com/"'
_SEE_DEVCONSOLE = (
    "Expected OAuth 2 access token, login cookie or other valid authentication credential. "
    "See https://developers.google.com/identity/sign-in/web/devconsole-project."
)


class _Invalid(Exception):
    """A 400 INVALID_ARGUMENT about the request body."""


def _bad(message: str) -> web.Response:
    return google_error(400, message)


def numeric_id(email: str) -> str:
    """A stable 21-digit id for a service account, like Google's ``uniqueId``."""
    digest = int(hashlib.sha256(email.encode("utf-8")).hexdigest(), 16)
    return str(10**20 + digest % 10**20)


def _check_fields(body: Any, known: Iterable[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Invalid("Invalid JSON payload received. Expected a JSON object.")
    for name in body:
        if name not in known:
            raise _Invalid(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
    delegates = body.get("delegates")
    if delegates is not None and not (
        isinstance(delegates, list) and all(isinstance(d, str) and d for d in delegates)
    ):
        raise _Invalid("Invalid value at 'delegates': must be a list of service account resource names.")
    return body


class FakeIam(FakeService):
    """IAM Credentials for a fixed set of service accounts the caller may impersonate."""

    def __init__(
        self,
        sts: FakeSts,
        service_accounts: set[str],
        *,
        google_signer: FakeOidcIssuer | None = None,
        lifetime_seconds: int = 3600,
        max_lifetime_seconds: int = 3600,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(lifetime_seconds=lifetime_seconds, now=now)
        self.sts = sts
        self.service_accounts = set(service_accounts)
        self.google_signer = google_signer if google_signer is not None else FakeGoogleSigner()
        self.max_lifetime_seconds = max_lifetime_seconds
        self.issued_access: set[str] = set()
        # Misconfigurations (SPEC §11), answered as IAM answers them.
        self.api_enabled = True  # False: SERVICE_DISABLED in project ``project_number``
        self.project_number = "123456789012"
        self.withheld: set[str] = set()  # permissions the caller lacks, e.g. getOpenIdToken
        self.issued_id: list[str] = []

    def _add_routes(self, application: web.Application) -> None:
        application.router.add_post("/v1/projects/{project}/serviceAccounts/{name}", self._dispatch)

    async def _dispatch(self, request: web.Request) -> web.Response:
        email, _, method = request.match_info["name"].rpartition(":")
        if method not in _METHODS or not email:
            return google_error(404, f"Method not found: {request.path}")
        permission, rpc, known_fields = _METHODS[method]
        if request.match_info["project"] != "-":
            return _bad(
                "Request contains an invalid argument. The project segment must be the '-' wildcard; "
                "a project ID is invalid."
            )
        denied = self._authenticate(request.headers.get("Authorization", ""), rpc)
        if denied is not None:
            return denied
        if not self.api_enabled:
            return self._service_disabled()
        if not is_json_type(media_type(request)):
            return _bad("Invalid request: Content-Type must be application/json.")
        if email not in self.service_accounts or permission in self.withheld:
            return google_error(
                403,
                f"Permission '{permission}' denied on resource (or it may not exist).",
                [error_info("IAM_PERMISSION_DENIED", "iam.googleapis.com", permission=permission)],
            )
        try:
            body = _check_fields(recorded(request).json, known_fields)
            if method == "generateAccessToken":
                return self._access_token(body)
            return self._id_token(email, body)
        except _Invalid as exc:
            return _bad(str(exc))

    def _service_disabled(self) -> web.Response:
        """The API is not enabled in the caller's project (the real body: a Help link, then ErrorInfo)."""
        number = self.project_number
        console = f"https://console.developers.google.com/apis/api/iamcredentials.googleapis.com/overview?project={number}"
        return google_error(
            403,
            f"IAM Service Account Credentials API has not been used in project {number} before or it is "
            f"disabled. Enable it by visiting {console} then retry. If you enabled this API recently, wait "
            "a few minutes for the action to propagate to our systems and retry.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [{"description": "Google developers console API activation", "url": console}],
                },
                error_info(
                    "SERVICE_DISABLED",
                    "googleapis.com",
                    consumer=f"projects/{number}",
                    service="iamcredentials.googleapis.com",
                ),
            ],
        )

    def _authenticate(self, authorization: str, rpc: str) -> web.Response | None:
        scheme, _, token = authorization.partition(" ")
        if not authorization:
            return google_error(
                401,
                f"Request is missing required authentication credential. {_SEE_DEVCONSOLE}",
                [
                    error_info(
                        "CREDENTIALS_MISSING", "googleapis.com", service="iamcredentials.googleapis.com"
                    )
                ],
                headers={"WWW-Authenticate": _REALM},
            )
        issued = self.sts.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if issued is None:
            return google_error(
                401,
                f"Request had invalid authentication credentials. {_SEE_DEVCONSOLE}",
                [error_info("ACCESS_TOKEN_TYPE_UNSUPPORTED", "googleapis.com")],
                headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
            )
        if IAM_SCOPES.isdisjoint(issued.scopes):
            return google_error(
                403,
                "Request had insufficient authentication scopes.",
                [
                    error_info(
                        "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                        "googleapis.com",
                        service="iamcredentials.googleapis.com",
                        method=f"google.iam.credentials.v1.IAMCredentials.{rpc}",
                    )
                ],
                headers={"WWW-Authenticate": f'{_REALM}, error="insufficient_scope"'},
            )
        return None

    def _access_token(self, body: dict[str, Any]) -> web.Response:
        scope = body.get("scope")
        if not (isinstance(scope, list) and scope and all(isinstance(s, str) and s for s in scope)):
            raise _Invalid("Invalid value at 'scope': must be a non-empty list of OAuth scopes.")
        requested = DEFAULT_LIFETIME
        if body.get("lifetime") is not None:
            match = _LIFETIME.match(str(body["lifetime"])) if isinstance(body["lifetime"], str) else None
            if match is None:
                raise _Invalid("Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration).")
            requested = int(match.group(1))
            if not 0 < requested <= self.max_lifetime_seconds:
                raise _Invalid(
                    f"Lifetime must be between 1s and {self.max_lifetime_seconds}s; longer lifetimes need "
                    "the constraints/iam.allowServiceAccountCredentialLifetimeExtension org policy."
                )
        lifetime = min(requested, self.lifetime_seconds)
        token = "ya29.fake-iam-" + secrets.token_urlsafe(32)
        self.issued_access.add(token)
        expire_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.now() + lifetime))
        return web.json_response({"accessToken": token, "expireTime": expire_time})

    def _id_token(self, email: str, body: dict[str, Any]) -> web.Response:
        audience = body.get("audience")
        if not isinstance(audience, str) or not audience:
            raise _Invalid("Invalid value at 'audience': a non-empty audience is required.")
        include_email = body.get("includeEmail")
        if include_email is not None and not isinstance(include_email, bool):
            raise _Invalid("Invalid value at 'include_email' (TYPE_BOOL).")
        uid = numeric_id(email)
        extra: dict[str, Any] = {"azp": uid}
        if include_email:
            extra.update(email=email, email_verified=True)
        token = self.google_signer.mint(
            audience, subject=uid, lifetime_seconds=self.lifetime_seconds, now=self.now(), extra_claims=extra
        )
        self.issued_id.append(token)
        return web.json_response({"token": token})

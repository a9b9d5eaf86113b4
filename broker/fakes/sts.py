"""A strict fake of Google STS (``POST /v1/token``).

It rejects what real STS rejects, with the real OAuth error shapes
(token-chain.md A), so the broker's form building and error mapping are tested
against the contract rather than against a permissive mock.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from broker.fakes._service import FakeService, media_type, oauth_error, recorded
from broker.fakes.oidc import FakeOidcIssuer

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_SUBJECT_TYPES = frozenset(
    {"urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token"}
)
MAX_SUBJECT_LIFETIME = 48 * 3600
CLOCK_SKEW = 300
INVALID_TARGET = (
    'The target service indicated by the "audience" parameters is invalid. This might either be because '
    "the pool or provider is disabled or deleted or because it doesn't exist."
)


@dataclass(frozen=True)
class IssuedToken:
    """A federated token this fake issued, so FakeIam can authenticate it."""

    value: str = field(repr=False)
    scopes: tuple[str, ...]
    expires_at: float
    subject: str
    options: dict[str, Any] | None = None


class StsRejected(Exception):
    """Raised by a subject-token validator: becomes STS's OAuth error answer."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def _decode_options(raw: str) -> dict[str, Any]:
    # Go sends the JSON once-encoded; google-auth quotes it again (token-chain.md A.3).
    for candidate in (raw, unquote(raw)):
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise StsRejected("invalid_request", 'Invalid value for "options". It must be a JSON object.')


class FakeSts(FakeService):
    """Google STS for one workload identity provider.

    It accepts JWT subject tokens from its issuer. Other subject token types
    (the tests' AWS ``aws4_request`` verifier) are plugged in with
    :meth:`accept_subject_type`; a type nobody registered is refused as real STS
    refuses an unsupported one.
    """

    def __init__(
        self,
        issuer: FakeOidcIssuer,
        audience: str,
        *,
        allowed_audiences: list[str] | None = None,
        lifetime_seconds: int = 3600,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(lifetime_seconds=lifetime_seconds, now=now)
        self.issuer = issuer
        self.audience = audience
        if allowed_audiences is None:
            # Google's default when the provider lists none (token-chain.md A.4).
            allowed_audiences = [audience, "https:" + audience]
        self.allowed_audiences = list(allowed_audiences)
        self.issued: dict[str, IssuedToken] = {}
        # The provider's settings a misconfiguration changes (SPEC §11); each is
        # refused with the error STS gives for it.
        self.disabled = False  # the provider or its pool is disabled: invalid_target
        self.issuer_uri = ""  # the provider's issuer URI when it is not the issuer's own
        self.attribute_condition: Callable[[dict[str, Any]], bool] | None = None
        # subject_token_type -> validator returning the claims; add AWS etc. here.
        self._subject_validators: dict[str, Callable[[str], dict[str, Any]]] = dict.fromkeys(
            JWT_SUBJECT_TYPES, self._jwt_claims
        )

    def accept_subject_type(self, token_type: str, validator: Callable[[str], dict[str, Any]] | None) -> None:
        """Accept ``token_type`` subject tokens checked by ``validator`` (None: refuse them again).

        The validator returns the claims (``sub`` at least) or raises :class:`StsRejected`.
        """
        if validator is None:
            self._subject_validators.pop(token_type, None)
        else:
            self._subject_validators[token_type] = validator

    def lookup(self, token: str) -> IssuedToken | None:
        """The issued token with this value, if it is still live."""
        issued = self.issued.get(token)
        if issued is None or issued.expires_at <= self.now():
            return None
        return issued

    def _add_routes(self, application: web.Application) -> None:
        application.router.add_post("/v1/token", self._token)

    async def _token(self, request: web.Request) -> web.Response:
        if media_type(request) != "application/x-www-form-urlencoded":
            return oauth_error(
                "invalid_request", "The request must use Content-Type application/x-www-form-urlencoded."
            )
        if request.headers.get("Authorization", "").lower().startswith("bearer"):
            return oauth_error(
                "invalid_request", "Do not send an Authorization Bearer header to the token endpoint."
            )
        form = recorded(request).form or {}
        try:
            issued = self._exchange(form)
        except StsRejected as exc:
            return oauth_error(exc.error, exc.description)
        self.issued[issued.value] = issued
        return web.json_response(
            {
                "access_token": issued.value,
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "token_type": "Bearer",
                "expires_in": self.lifetime_seconds,
            }
        )

    def _exchange(self, form: dict[str, str]) -> IssuedToken:
        if form.get("grant_type") != TOKEN_EXCHANGE:
            raise StsRejected(
                "unsupported_grant_type", f'Invalid value for "grant_type": {form.get("grant_type")!r}.'
            )
        if form.get("requested_token_type") != ACCESS_TOKEN_TYPE:
            raise StsRejected("invalid_request", 'Invalid value for "requested_token_type".')
        for name in ("audience", "subject_token", "subject_token_type", "scope"):
            if not form.get(name):
                raise StsRejected("invalid_request", f'The "{name}" parameter is required.')
        if form["subject_token_type"] not in self._subject_validators:
            raise StsRejected(
                "invalid_request", f'Invalid value for "subject_token_type": {form["subject_token_type"]!r}.'
            )
        if form["audience"] != self.audience or self.disabled:
            raise StsRejected("invalid_target", INVALID_TARGET)
        options = _decode_options(form["options"]) if "options" in form else None
        claims = self._subject_validators[form["subject_token_type"]](form["subject_token"])
        if self.attribute_condition is not None and not self.attribute_condition(claims):
            raise StsRejected("invalid_grant", "The given credential is rejected by the attribute condition.")
        now = self.now()
        return IssuedToken(
            value="ya29.fake-sts-" + secrets.token_urlsafe(32),
            scopes=tuple(form["scope"].split()),
            expires_at=now + self.lifetime_seconds,
            subject=str(claims["sub"]),
            options=options,
        )

    def _jwt_claims(self, token: str) -> dict[str, Any]:
        """Validate an OIDC subject token as STS does (token-chain.md A.4)."""
        now = self.now()
        try:
            claims = self.issuer.verify(token, now)
        except ValueError as exc:
            raise StsRejected("invalid_grant", f"Unable to verify the ID Token: {exc}.") from None
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int | float) or not isinstance(exp, int | float):
            raise StsRejected("invalid_grant", "The ID Token must contain numeric iat and exp claims.")
        if claims.get("iss") != (self.issuer_uri or self.issuer.issuer):
            raise StsRejected(
                "invalid_grant", f"The issuer in ID Token [{claims.get('iss')}] is not trusted."
            )
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise StsRejected("invalid_grant", "The ID Token must contain a sub claim.")
        if exp <= now:
            raise StsRejected("invalid_grant", f"ID Token issued at {int(iat)} is stale to sign-in.")
        if iat > now + CLOCK_SKEW:
            raise StsRejected("invalid_grant", f"ID Token issued at {int(iat)} is in the future.")
        if exp - iat >= MAX_SUBJECT_LIFETIME:
            raise StsRejected(
                "invalid_grant", "The ID Token lifetime (exp - iat) must be less than 48 hours."
            )
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if not any(isinstance(a, str) and a in self.allowed_audiences for a in auds):
            shown = ", ".join(str(a) for a in auds)
            raise StsRejected(
                "invalid_grant", f"The audience in ID Token [{shown}] does not match the expected audience."
            )
        return claims

"""A fake OIDC issuer: mints and verifies RS256 JWTs with a throwaway key.

It plays two roles. As the workload's identity provider it mints the subject
tokens (Kubernetes projected tokens, CI tokens) that the broker exchanges at
STS; as ``https://accounts.google.com`` it signs the ID tokens FakeIam hands
out. Signing goes through google-auth (the library real clients verify with)
so a token that round-trips here has the exact shape clients parse.

The key exists only in memory and is regenerated per instance, so nothing a
fake signs can ever be mistaken for a real credential.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.auth import crypt, jwt

DEFAULT_ISSUER = "https://oidc.fake.wif-broker.invalid"
GOOGLE_ISSUER = "https://accounts.google.com"
DEFAULT_SUBJECT = "system:serviceaccount:default:app"

# google-auth ships py.typed but leaves these unannotated; pin the shape we rely on.
_jwt_encode: Callable[..., bytes] = jwt.encode
_rsa_signer: Callable[..., Any] = crypt.RSASigner


def _b64decode(segment: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"segment is not base64url: {exc}") from None


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(segment))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


class FakeOidcIssuer:
    """An OIDC issuer with one RSA-2048 signing key identified by ``kid``."""

    def __init__(self, issuer: str = DEFAULT_ISSUER, kid: str = "fake-oidc-1") -> None:
        self.issuer = issuer
        self.kid = kid
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._public = self._key.public_key()
        self._signer = _rsa_signer(self._key, key_id=kid)

    @property
    def public_key_pem(self) -> bytes:
        """The verification key, for callers that want to check tokens themselves."""
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def mint(
        self,
        audience: str,
        subject: str = DEFAULT_SUBJECT,
        lifetime_seconds: int = 3600,
        now: float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """Return a signed JWT; ``extra_claims`` may override the standard ones."""
        iat = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": iat,
            "exp": iat + lifetime_seconds,
        }
        claims.update(extra_claims or {})
        return _jwt_encode(self._signer, claims, header={"alg": "RS256"}).decode("ascii")

    def verify(self, token: str, now: float) -> dict[str, Any]:
        """Check format, key id and signature; return the claims.

        Expiry, issue time and audience are deliberately *not* checked: the
        caller (FakeSts) owns those so it can answer with the exact error the
        real service gives. ``now`` only guards an explicit ``nbf``.
        """
        parts = token.split(".")
        if len(parts) != 3:
            raise ValueError(f"expected 3 JWT segments, got {len(parts)}")
        header = _json_object(parts[0], "JWT header")
        claims = _json_object(parts[1], "JWT payload")
        if header.get("alg") != "RS256":
            raise ValueError(f"unsupported JWT alg {header.get('alg')!r}")
        if header.get("kid") != self.kid:
            raise ValueError(f"unknown JWT kid {header.get('kid')!r}")
        signature = _b64decode(parts[2])
        try:
            self._public.verify(
                signature, f"{parts[0]}.{parts[1]}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
            )
        except (InvalidSignature, UnicodeEncodeError):
            raise ValueError("JWT signature does not verify") from None
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf > now:
            raise ValueError("JWT is not yet valid (nbf)")
        return claims


class FakeGoogleSigner(FakeOidcIssuer):
    """The issuer FakeIam signs ID tokens with: ``iss`` is Google's."""

    def __init__(self, kid: str = "fake-google-1") -> None:
        super().__init__(GOOGLE_ISSUER, kid=kid)

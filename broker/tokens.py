"""Value types for every token level the broker handles.

The secret is kept out of ``repr`` so that a token object that lands in a log
line, a traceback or an assertion message shows its kind and expiry only.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


class TokenKind(StrEnum):
    FEDERATED = "federated"
    ACCESS = "access"
    ID = "id"


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer credential and the wall-clock instant it stops being valid."""

    kind: TokenKind
    value: str = field(repr=False)
    expires_at: float


@dataclass(frozen=True, slots=True)
class ScopeSet:
    """An order- and duplicate-insensitive set of OAuth scopes (SPEC §4)."""

    scopes: tuple[str, ...]

    @classmethod
    def of(cls, scopes: Iterable[str]) -> ScopeSet:
        cleaned = {s.strip() for s in scopes if s.strip()}
        return cls(tuple(sorted(cleaned)))

    @classmethod
    def parse(cls, query_value: str) -> ScopeSet:
        # Python and gcloud join with ",", some tools with spaces; accept both.
        return cls.of(query_value.replace(" ", ",").split(","))

    def __bool__(self) -> bool:
        return bool(self.scopes)


@dataclass(frozen=True, slots=True)
class IdTokenKey:
    """What makes two ID-token requests interchangeable."""

    audience: str
    include_email: bool


@dataclass(frozen=True, slots=True)
class FederatedKey:
    """The cache key of a federated STS token.

    With impersonation one STS token serves every scope set, so the key is the
    fixed STS scope; without impersonation the STS token *is* the access token
    and the caller's scopes go to STS.
    """

    scopes: ScopeSet


# Visible ASCII, no space: what an OAuth bearer token (RFC 6750 b64token), a JWT
# and Google's opaque tokens are made of. Anything else (CR/LF, NUL, other
# controls, non-ASCII) cannot go into the Authorization header a client builds
# from it, and would break the header or the JSON of every answer that carries it.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


def header_safe(value: str) -> bool:
    """Whether ``value`` may be served and sent as a bearer token."""
    return _HEADER_SAFE.fullmatch(value) is not None


def unverified_claims(token: str) -> dict[str, Any]:
    """JWT claims without signature checks: only to read exp, aud, email, iss.

    What ``google.auth.jwt.decode(token, verify=False)`` returns (tests/test_tokens.py
    checks it against that on signed tokens), written out because importing
    google.auth.jwt loads cryptography: +9.7 MB resident and +33 ms of start-up for
    a base64 decode and a json.loads, which put the AWS and Azure brokers over 60 MB.
    Any malformed token is a ValueError, including one that is not a string at all (the
    value of a JSON reply's field, e.g. generateIdToken's ``token``).
    """
    if not isinstance(token, str):
        raise ValueError("a JWT is a string")
    segments = token.split(".")
    if len(segments) != 3:
        raise ValueError("a JWT has three dot-separated segments")
    try:
        payload = base64.urlsafe_b64decode(segments[1] + "=" * (-len(segments[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, RecursionError) as exc:
        raise ValueError("JWT payload is not base64url-encoded JSON") from exc
    if not isinstance(claims, dict):
        raise ValueError("JWT payload is not an object")
    return claims

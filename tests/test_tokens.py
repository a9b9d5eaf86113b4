"""``tokens.unverified_claims`` against google-auth's own decoder.

The broker reads JWT claims (exp, aud, iss, sub) without google.auth.jwt so that
cryptography stays out of the serving process; these tests hold it to what
``google.auth.jwt.decode(token, verify=False)`` returns on real signed tokens.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from google.auth import jwt

from broker.fakes.oidc import FakeOidcIssuer
from broker.tokens import unverified_claims

ISSUER = FakeOidcIssuer()


def google_auth_claims(token: str) -> Any:
    return jwt.decode(token, verify=False)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"sub": "system:serviceaccount:ns:app", "aud": ["a", "b"]},
        {"email": "app@p.iam.gserviceaccount.com", "email_verified": True},
        {"name": "Zoë 山田 ✓", "nested": {"k": [1, 2.5, None]}},
        # Payload lengths landing on every base64 remainder (no padding, one, two '=').
        {"x": "a"},
        {"x": "ab"},
        {"x": "abc"},
    ],
)
def test_claims_match_google_auth_on_signed_tokens(extra: dict[str, Any]) -> None:
    token = ISSUER.mint("https://example.test/aud", extra_claims=extra)
    assert unverified_claims(token) == google_auth_claims(token)


def _segment(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


HEADER = _segment(b'{"alg":"RS256","typ":"JWT"}')
NOT_UTF8 = _segment(bytes([0xFF, 0xFE]))
DEEP = _segment(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-jwt",
        f"{HEADER}.{_segment(b'{}')}",  # two segments
        f"{HEADER}.{_segment(b'{}')}.sig.extra",  # four
        f"{HEADER}.@@@@.sig",  # not base64url
        f"{HEADER}.{_segment(b'not json')}.sig",
        f"{HEADER}.{_segment(b'[1, 2]')}.sig",  # JSON, not an object
        f"{HEADER}.{NOT_UTF8}.sig",
        f"{HEADER}.{DEEP}.sig",  # nested past the recursion limit
        f"{HEADER}.é.sig",  # not ASCII
        7,  # a JSON reply's field that is not a string
        None,
    ],
)
def test_malformed_tokens_are_value_errors(token: object) -> None:
    with pytest.raises(ValueError, match=r"JWT|segments|Expecting|decode|ASCII|base64"):
        unverified_claims(token)  # type: ignore[arg-type]


SHALLOW_MALFORMED = [
    "not-a-jwt",
    f"{HEADER}.{_segment(b'not json')}.sig",
    f"{HEADER}.{_segment(b'[1, 2]')}.sig",
    f"{HEADER}.{NOT_UTF8}.sig",
]


@pytest.mark.parametrize("token", SHALLOW_MALFORMED)
def test_google_auth_also_refuses_the_malformed_tokens(token: str) -> None:
    """Control: these are errors for google-auth too, so the two decoders agree on what a
    JWT is (deep nesting aside: google-auth lets RecursionError escape)."""
    with pytest.raises(ValueError, match=r"segments|parse|decode|JSON object"):
        google_auth_claims(token)

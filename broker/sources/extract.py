"""Pulling the subject token out of raw file or URL content (text or json format)."""

from __future__ import annotations

from broker import httpclient
from broker.credconfig import TokenFormat
from broker.diagnosis import TOKEN_FIELD_FIX, iso
from broker.errors import Step, Transient
from broker.tokens import unverified_claims


def describe_jwt(token: str) -> dict[str, str]:
    """The claims a provider is configured against: iss, sub, aud, and time left."""
    try:
        claims = unverified_claims(token)
    except ValueError:
        return {"format": "not a JWT"}
    described = {key: str(claims.get(key, "")) for key in ("iss", "sub", "aud")}
    exp = claims.get("exp")
    if isinstance(exp, int | float):
        described["exp"] = iso(exp)
    return described


def extract(raw: bytes, fmt: TokenFormat, where: str) -> str:
    text = raw.decode("utf-8", "replace")
    if fmt.type == "json":
        try:
            data = httpclient.loads(text.encode())  # bounded nesting: ValueError, never RecursionError
        except ValueError:
            raise Transient(Step.SUBJECT_TOKEN, f"{where} is not valid JSON") from None
        value = data.get(fmt.subject_token_field_name) if isinstance(data, dict) else None
        if not isinstance(value, str):
            raise Transient(
                Step.SUBJECT_TOKEN,
                f"{where} has no string field {fmt.subject_token_field_name!r}",
                fix=TOKEN_FIELD_FIX,
            )
        text = value
    # google-auth keeps a trailing newline verbatim; STS would reject it, so strip.
    token = text.strip()
    if not token:
        raise Transient(Step.SUBJECT_TOKEN, f"{where} holds an empty token")
    return token

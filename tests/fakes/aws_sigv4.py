"""Verify an AWS subject token the way Google STS does: parse it, check it, replay the signature.

The token is a SigV4-signed ``GetCallerIdentity`` serialized as JSON and
URL-quoted (token-chain.md D.4). Google cannot check the signature itself; it
replays the request to AWS, which answers with an error code that STS relays as
``invalid_grant: Received invalid AWS response of type …``. Here the "replay"
recomputes the signature with botocore's own ``SigV4Auth`` and the secret the
FakeAwsAccount issued, so a signature the broker computed wrongly fails here as
it would in production.
"""

from __future__ import annotations

import calendar
import hmac
import json
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import ReadOnlyCredentials

from tests.fakes.aws_account import AwsCredentials

AWS4_REQUEST_TYPE = "urn:ietf:params:aws:token-type:aws4_request"
TARGET_RESOURCE = "x-goog-cloud-target-resource"
MAX_SKEW_SECONDS = 15 * 60  # AWS refuses SigV4 requests further than this from its clock
AMZ_DATE = "%Y%m%dT%H%M%SZ"
REQUIRED_HEADERS = ("authorization", "host", "x-amz-date", TARGET_RESOURCE)
_STS_HOST = re.compile(r"^sts\.([a-z]{2}(?:-[a-z0-9]+)+-\d+)\.amazonaws\.com$")
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})$"
)
_QUERY = [("Action", "GetCallerIdentity"), ("Version", "2011-06-15")]
_INVALID_TOKEN = "The security token included in the request is invalid."
_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check your AWS "
    "Secret Access Key and signing method. Consult the service documentation for details."
)


class AwsSubjectRejected(Exception):
    """Why STS refuses the token: an OAuth ``error`` code and its description."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def _malformed(why: str) -> AwsSubjectRejected:
    return AwsSubjectRejected("invalid_request", f'Invalid value for "subject_token": {why}')


def _aws(code: str, message: str) -> AwsSubjectRejected:
    return AwsSubjectRejected(
        "invalid_grant", f"Received invalid AWS response of type {code} with error message: {message}"
    )


@dataclass(frozen=True)
class SignedRequest:
    """A parsed subject token. Header names are lower-cased."""

    url: str
    method: str
    headers: dict[str, str] = field(repr=False)
    body: str
    region: str  # from the URL's host
    access_key_id: str
    scope: tuple[str, str, str, str]  # date, region, service, terminator
    signed_headers: tuple[str, ...]
    signature: str


def _headers(raw: object) -> dict[str, str]:
    if not isinstance(raw, list):
        raise _malformed('"headers" must be a list of {"key", "value"} objects.')
    headers: dict[str, str] = {}
    for entry in raw:
        if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)):
            raise _malformed('each header must be an object with string "key" and "value".')
        if not isinstance(entry.get("value"), str):
            raise _malformed(f'header {entry["key"]!r} has no string "value".')
        name = entry["key"].lower()
        if name in headers:
            raise _malformed(f"header {name!r} appears more than once.")
        headers[name] = entry["value"]
    return headers


def parse_aws_subject_token(subject_token: str) -> SignedRequest:
    """Decode the form-decoded ``subject_token`` once more and check its shape (not its signature)."""
    try:
        value = json.loads(unquote_plus(subject_token))
    except json.JSONDecodeError:
        raise _malformed("it is not a URL-encoded JSON object.") from None
    if not isinstance(value, dict) or not isinstance(value.get("url"), str):
        raise _malformed('it must be a JSON object with "url", "method" and "headers".')
    if value.get("method") != "POST":
        raise _malformed(f'"method" must be POST, not {value.get("method")!r}.')
    body = value.get("body", "")
    if not isinstance(body, str):
        raise _malformed('"body" must be a string.')
    headers = _headers(value.get("headers"))
    url = value["url"]
    parts = urlsplit(url)
    host = _STS_HOST.match(parts.netloc)
    if (
        parts.scheme != "https"
        or host is None
        or parts.path not in ("", "/")
        or parts.fragment
        or sorted(parse_qsl(parts.query, keep_blank_values=True)) != _QUERY
    ):
        raise _malformed(
            f"the url {url!r} is not https://sts.<region>.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15."
        )
    for name in REQUIRED_HEADERS:
        if not headers.get(name):
            raise _malformed(f"the signed request has no {name!r} header.")
    if headers["host"] != parts.netloc:
        raise _malformed(f"the host header {headers['host']!r} does not match the url.")
    auth = _AUTHORIZATION.match(headers["authorization"])
    credential = auth["credential"].split("/") if auth else []
    if auth is None or len(credential) != 5:
        raise _aws("IncompleteSignature", f"Authorization header is malformed: {headers['authorization']!r}")
    return SignedRequest(
        url=url,
        method=value["method"],
        headers=headers,
        body=body,
        region=host[1],
        access_key_id=credential[0],
        scope=(credential[1], credential[2], credential[3], credential[4]),
        signed_headers=tuple(auth["signed"].split(";")),
        signature=auth["signature"],
    )


class _ListedHeadersSigner(SigV4Auth):
    """botocore's SigV4, signing exactly the headers on the request (the client's SignedHeaders)."""

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        headers = HTTPHeaders()
        for name, value in request.headers.items():
            headers[name.lower()] = value
        return headers


def sigv4_signature(request: SignedRequest, secret_access_key: str) -> str:
    """What the signature should be for this request signed with ``secret_access_key``."""
    _, region, service, _ = request.scope
    aws_request = AWSRequest(
        method=request.method,
        url=request.url,
        data=request.body.encode("utf-8") or None,
        headers={name: request.headers[name] for name in request.signed_headers},
    )
    # What add_auth would do with a frozen clock: the timestamp comes from the request.
    aws_request.context["timestamp"] = request.headers["x-amz-date"]
    signer = _ListedHeadersSigner(
        ReadOnlyCredentials(request.access_key_id, secret_access_key, None), service, region
    )
    canonical = signer.canonical_request(aws_request)
    return signer.signature(signer.string_to_sign(aws_request, canonical), aws_request)


def _check_scope(request: SignedRequest) -> None:
    date, region, service, terminator = request.scope
    if terminator != "aws4_request":
        raise _aws(
            "SignatureDoesNotMatch",
            f"Credential should be scoped with a valid terminator: 'aws4_request', not '{terminator}'.",
        )
    if service != "sts":
        raise _aws("SignatureDoesNotMatch", "Credential should be scoped to correct service: 'sts'. ")
    if region != request.region:
        raise _aws(
            "SignatureDoesNotMatch", f"Credential should be scoped to a valid region, not '{region}'. "
        )
    amz_date = request.headers["x-amz-date"]
    if date != amz_date[:8]:
        raise _aws(
            "SignatureDoesNotMatch",
            f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
            f"'{date}' != '{amz_date[:8]}', from 'x-amz-date'.",
        )


def _check_time(amz_date: str, now: float) -> None:
    try:
        signed_at = calendar.timegm(time.strptime(amz_date, AMZ_DATE))
    except ValueError:
        raise _aws(
            "IncompleteSignature", f"Date must be in ISO-8601 'basic format'. Got '{amz_date}'."
        ) from None
    stamp = time.strftime(AMZ_DATE, time.gmtime(now))
    if signed_at < now - MAX_SKEW_SECONDS:
        earliest = time.strftime(AMZ_DATE, time.gmtime(now - MAX_SKEW_SECONDS))
        raise _aws(
            "SignatureDoesNotMatch",
            f"Signature expired: {amz_date} is now earlier than {earliest} ({stamp} - 15 min.)",
        )
    if signed_at > now + MAX_SKEW_SECONDS:
        latest = time.strftime(AMZ_DATE, time.gmtime(now + MAX_SKEW_SECONDS))
        raise _aws(
            "SignatureDoesNotMatch",
            f"Signature not yet current: {amz_date} is still later than {latest} ({stamp} + 15 min.)",
        )


def verify_aws_subject_token(
    subject_token: str,
    *,
    audiences: Collection[str],
    lookup: Callable[[str], AwsCredentials | None],
    now: float,
) -> AwsCredentials:
    """The credentials that signed the token, or AwsSubjectRejected with STS's error."""
    request = parse_aws_subject_token(subject_token)
    target = request.headers[TARGET_RESOURCE]
    if target not in audiences:
        raise AwsSubjectRejected(
            "invalid_grant",
            f"The target resource in the {TARGET_RESOURCE} header [{target}] does not match the audience.",
        )
    signed = set(request.signed_headers)
    if "host" not in signed:
        raise _aws(
            "IncompleteSignature", "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization."
        )
    if "x-amz-date" not in signed:
        raise _aws("IncompleteSignature", "'X-Amz-Date' must be a 'SignedHeader' in the AWS Authorization.")
    if TARGET_RESOURCE not in signed:
        raise AwsSubjectRejected(
            "invalid_grant",
            f"The {TARGET_RESOURCE} header must be signed: list it in the SignedHeaders of the AWS request.",
        )
    missing = sorted(signed - request.headers.keys())
    if missing:
        raise _malformed(f"SignedHeaders lists {missing} but the serialized request has no such header.")
    _check_scope(request)
    _check_time(request.headers["x-amz-date"], now)
    creds = lookup(request.access_key_id)
    if creds is None or request.headers.get("x-amz-security-token") != creds.session_token:
        raise _aws("InvalidClientTokenId", _INVALID_TOKEN)
    if creds.expires_at <= now:
        raise _aws("ExpiredToken", "The security token included in the request is expired")
    expected = sigv4_signature(request, creds.secret_access_key)
    if not hmac.compare_digest(expected, request.signature):
        raise _aws("SignatureDoesNotMatch", _MISMATCH)
    return creds

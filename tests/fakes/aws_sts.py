"""A fake of AWS STS, the Query/XML protocol botocore speaks.

``POST /`` with the unsigned form ``Action=AssumeRoleWithWebIdentity&Version=2011-06-15
&RoleArn=…&RoleSessionName=…&WebIdentityToken=…`` (EKS IRSA) answers with the XML
of token-chain.md D.6. ``Action=GetCallerIdentity`` (form body or query string)
must be SigV4-signed with keys the account issued; the signature is recomputed
with the issued secret, and the answer names the caller's assumed-role ARN. Bad
input gets an AWS ``ErrorResponse`` botocore parses into a ``ClientError`` with
the real error code.
"""

from __future__ import annotations

import calendar
import hmac
import re
import time
import uuid
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape

from aiohttp import web
from google.auth import jwt

from broker.fakes._service import FakeService, recorded
from broker.fakes.oidc import FakeOidcIssuer
from tests.fakes.aws_account import AwsCredentials, FakeAwsAccount, iso8601
from tests.fakes.aws_sigv4 import AMZ_DATE, MAX_SKEW_SECONDS, SignedRequest, sigv4_signature

NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
VERSION = "2011-06-15"
IRSA_AUDIENCE = "sts.amazonaws.com"
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
_SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<signature>[0-9a-f]{64})$"
)
_INVALID_TOKEN = "The security token included in the request is invalid."
_jwt_decode: Callable[..., dict[str, Any]] = jwt.decode


class _StsError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _xml_error(exc: _StsError) -> web.Response:
    body = (
        f'<ErrorResponse xmlns="{NAMESPACE}">\n'
        f"  <Error>\n    <Type>Sender</Type>\n    <Code>{escape(exc.code)}</Code>\n"
        f"    <Message>{escape(exc.message)}</Message>\n  </Error>\n"
        f"  <RequestId>{uuid.uuid4()}</RequestId>\n</ErrorResponse>\n"
    )
    return web.Response(text=body, status=exc.status, content_type="text/xml")


def _validate(form: dict[str, str]) -> None:
    """AWS's aggregated "N validation errors detected" for the required members."""
    problems: list[str] = []
    for member, wire, minimum in (
        ("roleArn", "RoleArn", 20),
        ("roleSessionName", "RoleSessionName", 2),
        ("webIdentityToken", "WebIdentityToken", 4),
    ):
        value = form.get(wire)
        if value is None:
            problems.append(f"Value null at '{member}' failed to satisfy constraint: Member must not be null")
        elif len(value) < minimum:
            problems.append(
                f"Value '{value}' at '{member}' failed to satisfy constraint: "
                f"Member must have length greater than or equal to {minimum}"
            )
    session = form.get("RoleSessionName")
    if session and len(session) >= 2 and not _SESSION_NAME.match(session):
        problems.append(
            f"Value '{session}' at 'roleSessionName' failed to satisfy constraint: "
            "Member must satisfy regular expression pattern: [\\w+=,.@-]*"
        )
    duration = form.get("DurationSeconds")
    if duration is not None and not (duration.isdigit() and 900 <= int(duration) <= 43200):
        problems.append(
            f"Value '{duration}' at 'durationSeconds' failed to satisfy constraint: "
            "Member must have value between 900 and 43200"
        )
    if problems:
        count = f"{len(problems)} validation error{'s' if len(problems) > 1 else ''} detected"
        raise _StsError(400, "ValidationError", f"{count}: {'; '.join(problems)}")


class FakeAwsSts(FakeService):
    """STS for one account. With ``issuer``, web identity tokens must be JWTs it signed.

    Without an issuer any token of the minimum length is accepted, and its
    claims (if it is a JWT) only decorate the response. ``lifetime_seconds`` is
    the default ``DurationSeconds``.
    """

    def __init__(
        self,
        account: FakeAwsAccount,
        *,
        issuer: FakeOidcIssuer | None = None,
        audience: str | None = IRSA_AUDIENCE,
        lifetime_seconds: int = 3600,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(lifetime_seconds=lifetime_seconds, now=now)
        self.account = account
        self.issuer = issuer
        self.audience = audience

    def _add_routes(self, application: web.Application) -> None:
        application.router.add_post("/", self._dispatch)
        application.router.add_get("/", self._dispatch)  # the Query protocol also takes GET

    async def _dispatch(self, request: web.Request) -> web.Response:
        form = dict(request.query)
        form.update(recorded(request).form or {})
        try:
            action, version = form.get("Action"), form.get("Version")
            if action == "GetCallerIdentity" and version == VERSION:
                return self._caller_identity(self._authenticate(request))
            if action != "AssumeRoleWithWebIdentity" or version != VERSION:
                raise _StsError(
                    400, "InvalidAction", f"Could not find operation {action} for version {version}"
                )
            _validate(form)
            if not _ROLE_ARN.match(form["RoleArn"]):
                raise _StsError(400, "ValidationError", f"{form['RoleArn']} is invalid")
            claims = self._claims(form["WebIdentityToken"])
            if form["RoleArn"] != self.account.role_arn:
                raise _StsError(
                    403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity"
                )
        except _StsError as exc:
            return _xml_error(exc)
        session = form["RoleSessionName"]
        lifetime = int(form.get("DurationSeconds") or self.lifetime_seconds)
        creds = self.account.issue(session_name=session, lifetime_seconds=lifetime)
        extra = ""
        if isinstance(claims.get("sub"), str):
            extra += (
                f"    <SubjectFromWebIdentityToken>{escape(claims['sub'])}</SubjectFromWebIdentityToken>\n"
            )
        if isinstance(claims.get("aud"), str):
            extra += f"    <Audience>{escape(claims['aud'])}</Audience>\n"
        if isinstance(claims.get("iss"), str):
            extra += f"    <Provider>{escape(claims['iss'])}</Provider>\n"
        body = (
            f'<AssumeRoleWithWebIdentityResponse xmlns="{NAMESPACE}">\n'
            "  <AssumeRoleWithWebIdentityResult>\n"
            f"{extra}"
            "    <AssumedRoleUser>\n"
            f"      <Arn>{escape(creds.arn)}</Arn>\n"
            f"      <AssumedRoleId>{self.account.role_id}:{escape(session)}</AssumedRoleId>\n"
            "    </AssumedRoleUser>\n"
            "    <Credentials>\n"
            f"      <SessionToken>{escape(creds.session_token or '')}</SessionToken>\n"
            f"      <SecretAccessKey>{escape(creds.secret_access_key)}</SecretAccessKey>\n"
            f"      <Expiration>{iso8601(creds.expires_at)}</Expiration>\n"
            f"      <AccessKeyId>{creds.access_key_id}</AccessKeyId>\n"
            "    </Credentials>\n"
            "  </AssumeRoleWithWebIdentityResult>\n"
            f"  <ResponseMetadata>\n    <RequestId>{uuid.uuid4()}</RequestId>\n  </ResponseMetadata>\n"
            "</AssumeRoleWithWebIdentityResponse>\n"
        )
        return web.Response(text=body, content_type="text/xml")

    def _authenticate(self, request: web.Request) -> AwsCredentials:
        """The issued credentials whose secret signed this request (SigV4, as AWS checks it)."""
        call = recorded(request)
        headers = call.headers
        if "authorization" not in headers:
            raise _StsError(403, "MissingAuthenticationToken", "Request is missing Authentication Token")
        auth = _AUTHORIZATION.match(headers["authorization"])
        credential = auth["credential"].split("/") if auth else []
        if auth is None or len(credential) != 5:
            raise _StsError(403, "IncompleteSignature", "Authorization header is malformed")
        signed = tuple(auth["signed"].split(";"))
        if not {"host", "x-amz-date"} <= set(signed) or not set(signed) <= headers.keys():
            raise _StsError(403, "IncompleteSignature", f"Signed headers {signed} are incomplete or absent")
        try:
            signed_at = calendar.timegm(time.strptime(headers["x-amz-date"], AMZ_DATE))
        except ValueError:
            raise _StsError(403, "IncompleteSignature", "X-Amz-Date is not ISO-8601 basic format") from None
        now = self.now()
        if abs(signed_at - now) > MAX_SKEW_SECONDS:
            raise _StsError(403, "SignatureDoesNotMatch", "Signature expired or not yet current")
        creds = self.account.lookup(credential[0])
        if creds is None or headers.get("x-amz-security-token") != creds.session_token:
            raise _StsError(403, "InvalidClientTokenId", _INVALID_TOKEN)
        if creds.expires_at <= now:
            raise _StsError(400, "ExpiredToken", "The security token included in the request is expired")
        signed_request = SignedRequest(
            url=f"{request.scheme}://{request.host}{request.path_qs}",
            method=request.method,
            headers=headers,
            body=call.body.decode("utf-8", "replace"),
            region=credential[2],
            access_key_id=credential[0],
            scope=(credential[1], credential[2], credential[3], credential[4]),
            signed_headers=signed,
            signature=auth["signature"],
        )
        expected = sigv4_signature(signed_request, creds.secret_access_key)
        if credential[3] != "sts" or not hmac.compare_digest(expected, auth["signature"]):
            raise _StsError(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        return creds

    def _caller_identity(self, creds: AwsCredentials) -> web.Response:
        session = creds.arn.rsplit("/", 1)[-1]
        body = (
            f'<GetCallerIdentityResponse xmlns="{NAMESPACE}">\n'
            "  <GetCallerIdentityResult>\n"
            f"    <Arn>{escape(creds.arn)}</Arn>\n"
            f"    <UserId>{self.account.role_id}:{escape(session)}</UserId>\n"
            f"    <Account>{self.account.account_id}</Account>\n"
            "  </GetCallerIdentityResult>\n"
            f"  <ResponseMetadata>\n    <RequestId>{uuid.uuid4()}</RequestId>\n  </ResponseMetadata>\n"
            "</GetCallerIdentityResponse>\n"
        )
        return web.Response(text=body, content_type="text/xml")

    def _claims(self, token: str) -> dict[str, Any]:
        if self.issuer is None:
            try:
                decoded = _jwt_decode(token, verify=False)
            except (ValueError, TypeError):
                return {}
            return decoded if isinstance(decoded, dict) else {}
        now = self.now()
        try:
            claims = self.issuer.verify(token, now)
        except ValueError as exc:
            raise _StsError(
                400, "InvalidIdentityToken", f"Couldn't verify the web identity token: {exc}"
            ) from None
        if claims.get("iss") != self.issuer.issuer:
            raise _StsError(
                400,
                "InvalidIdentityToken",
                f"No OpenIDConnect provider found in your account for {claims.get('iss')}",
            )
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= now:
            raise _StsError(
                400,
                "ExpiredTokenException",
                f"Token expired: current date/time {iso8601(now)} must be before the expiration date/time "
                f"{iso8601(exp) if isinstance(exp, int | float) else exp}",
            )
        aud = claims.get("aud")
        if self.audience is not None and self.audience not in (aud if isinstance(aud, list) else [aud]):
            raise _StsError(400, "InvalidIdentityToken", "Incorrect token audience")
        return claims

"""The AWS fakes speak the real wire formats: real botocore gets credentials from each of them,
and FakeSts verifies SigV4-signed GetCallerIdentity subject tokens exactly as botocore signs them.

botocore's clock is frozen only to reproduce the published SigV4 vectors; every
other signature uses the real clock and the fakes' clock follows it.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import quote, quote_plus

import botocore.auth
import botocore.session
import pytest
from aiohttp.test_utils import TestClient
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from broker.fakes import FakeSts
from broker.fakes.oidc import FakeOidcIssuer
from tests.fakes.aws import (
    AwsCredentials,
    FakeAws,
    FakeAwsAccount,
    FakeAwsSts,
    FakeEcsCredentials,
    FakeImds,
    accept_aws,
    parse_aws_subject_token,
    sigv4_signature,
)

AUDIENCE = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/aws"
AWS4 = "urn:ietf:params:aws:token-type:aws4_request"
TARGET = "x-goog-cloud-target-resource"
CREDS = "/latest/meta-data/iam/security-credentials"
FORM = "application/x-www-form-urlencoded"
STS_NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"

Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]


class Clock:
    def __init__(self, t: float | None = None) -> None:
        self.t = float(int(time.time())) if t is None else t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def account(clock: Clock) -> FakeAwsAccount:
    return FakeAwsAccount(now=clock)


@pytest.fixture
async def aws() -> AsyncIterator[FakeAws]:
    async with FakeAws(pod_identity_token="eks-pod-identity-token-value", issuer=FakeOidcIssuer()) as fake:
        yield fake


def botocore_credentials(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> tuple[str, ReadOnlyCredentials]:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    creds = botocore.session.get_session().get_credentials()
    assert creds is not None
    # Web-identity credentials are fetched lazily, here: keep it off the event loop too.
    return creds.method, creds.get_frozen_credentials()


async def resolve(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[str, ReadOnlyCredentials]:
    """(method, frozen credentials) from botocore's default chain, run off the event loop."""
    return await asyncio.to_thread(botocore_credentials, env, monkeypatch)


def assert_same(creds: ReadOnlyCredentials, issued: AwsCredentials) -> None:
    assert creds.access_key == issued.access_key_id
    assert creds.secret_key == issued.secret_access_key
    assert creds.token == issued.session_token


# --- botocore against each credential source -------------------------------------------------


async def test_botocore_reads_imdsv2(aws: FakeAws, monkeypatch: pytest.MonkeyPatch) -> None:
    method, creds = await resolve(aws.imds_env(), monkeypatch)
    assert method == "iam-role"
    assert_same(creds, aws.account.current())
    assert aws.account.current().access_key_id.startswith("ASIA")
    calls = [(c.method, c.path) for c in aws.imds.calls]
    assert calls == [
        ("PUT", "/latest/api/token"),
        ("GET", CREDS + "/"),
        ("GET", f"{CREDS}/{aws.account.role_name}"),
    ]
    assert aws.imds.calls[0].headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert all(c.headers["x-aws-ec2-metadata-token"] in aws.imds.tokens for c in aws.imds.calls[1:])

    old = aws.account.current()
    aws.account.rotate()
    _, creds = await resolve(aws.imds_env(), monkeypatch)
    assert creds.access_key != old.access_key_id
    assert_same(creds, aws.account.current())


async def test_botocore_reads_pod_identity_container_endpoint(
    aws: FakeAws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("eks-pod-identity-token-value")
    method, creds = await resolve(aws.container_env(str(token_file)), monkeypatch)
    assert method == "container-role"
    assert_same(creds, aws.account.current())
    (call,) = aws.container.calls
    assert (call.method, call.path) == ("GET", "/v1/credentials")
    assert call.headers["authorization"] == "eks-pod-identity-token-value"


async def test_botocore_assumes_role_with_web_identity(
    aws: FakeAws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert aws.sts.issuer is not None
    token_file = tmp_path / "token"
    jwt = aws.sts.issuer.mint("sts.amazonaws.com", subject="system:serviceaccount:ns:app")
    token_file.write_text(jwt)
    method, creds = await resolve(aws.web_identity_env(str(token_file)), monkeypatch)
    assert method == "assume-role-with-web-identity"
    assert creds.access_key is not None
    issued = aws.account.lookup(creds.access_key)
    assert issued is not None
    assert_same(creds, issued)
    (call,) = aws.sts.calls
    assert call.form is not None
    assert call.form["Action"] == "AssumeRoleWithWebIdentity"
    assert call.form["Version"] == "2011-06-15"
    assert call.form["RoleArn"] == "arn:aws:iam::123456789012:role/wif-broker-role"
    assert call.form["WebIdentityToken"] == jwt
    assert "authorization" not in call.headers  # the call is unsigned
    session = call.form["RoleSessionName"]
    assert issued.arn == f"arn:aws:sts::123456789012:assumed-role/wif-broker-role/{session}"


# --- the fakes' own rules, over HTTP ---------------------------------------------------------


async def test_imds_demands_a_session_token(
    account: FakeAwsAccount, clock: Clock, aiohttp_client: ClientFactory
) -> None:
    imds = FakeImds(account, availability_zone="us-west-2-lax-1a", region="us-west-2", now=clock)
    client = await aiohttp_client(imds.app())
    assert (await client.get(CREDS + "/")).status == 401
    ttl = "X-aws-ec2-metadata-token-ttl-seconds"
    for bad in ({}, {ttl: "0"}, {ttl: "21601"}, {ttl: "abc"}):
        assert (await client.put("/latest/api/token", headers=bad)).status == 400
    forwarded = {ttl: "60", "X-Forwarded-For": "10.0.0.1"}
    assert (await client.put("/latest/api/token", headers=forwarded)).status == 403
    resp = await client.put("/latest/api/token", headers={ttl: "60"})
    assert resp.status == 200
    token = await resp.text()
    auth = {"X-aws-ec2-metadata-token": token}
    assert (await client.get(CREDS, headers={"X-aws-ec2-metadata-token": "forged"})).status == 401
    for path in (CREDS, CREDS + "/"):
        resp = await client.get(path, headers=auth)
        assert (resp.status, await resp.text()) == (200, "wif-broker-role")
    resp = await client.get(f"{CREDS}/wif-broker-role", headers=auth)
    doc = json.loads(await resp.text())
    current = account.current()
    assert doc["Code"] == "Success"
    assert doc["Type"] == "AWS-HMAC"
    assert doc["LastUpdated"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock()))
    assert (doc["AccessKeyId"], doc["SecretAccessKey"]) == (current.access_key_id, current.secret_access_key)
    assert (doc["Token"], doc["Expiration"]) == (current.session_token, current.expiration)
    assert (await client.get(f"{CREDS}/other-role", headers=auth)).status == 404
    resp = await client.get("/latest/meta-data/placement/availability-zone", headers=auth)
    assert await resp.text() == "us-west-2-lax-1a"
    resp = await client.get("/latest/meta-data/placement/region/", headers=auth)
    assert await resp.text() == "us-west-2"

    imds.role_attached = False
    assert (await client.get(CREDS + "/", headers=auth)).status == 404
    clock.t += 61
    assert (await client.get("/latest/meta-data/placement/region", headers=auth)).status == 401
    imds.v1_enabled = True
    assert (await client.get("/latest/meta-data/placement/region")).status == 200
    assert (await client.get("/latest/meta-data/placement/region", headers=auth)).status == 401


async def test_account_lifetime_and_rotation(account: FakeAwsAccount, clock: Clock) -> None:
    imds = FakeImds(account, now=clock)
    imds.lifetime_seconds = 900
    assert account.lifetime_seconds == 900
    first = account.current()
    assert first.expires_at == clock() + 900
    assert account.current() is first
    assert first.role_arn == account.role_arn == "arn:aws:iam::123456789012:role/wif-broker-role"
    assert first.arn == "arn:aws:sts::123456789012:assumed-role/wif-broker-role/i-0123456789abcdef0"
    clock.t += 900
    second = account.current()
    assert second.access_key_id != first.access_key_id
    third = account.rotate(revoke=True)
    assert account.current() is third
    assert account.lookup(second.access_key_id) is None
    assert account.lookup(first.access_key_id) is first  # expired, not revoked: still known
    assert first.secret_access_key not in repr(first)


async def test_container_endpoint_checks_raw_authorization(
    account: FakeAwsAccount, aiohttp_client: ClientFactory
) -> None:
    ecs = FakeEcsCredentials(account, path="/v2/credentials/abc", authorization="raw-token")
    client = await aiohttp_client(ecs.app())
    for headers in ({}, {"Authorization": "Bearer raw-token"}, {"Authorization": "other"}):
        assert (await client.get("/v2/credentials/abc", headers=headers)).status == 401
    assert (await client.get("/v1/credentials", headers={"Authorization": "raw-token"})).status == 404
    resp = await client.get("/v2/credentials/abc", headers={"Authorization": "raw-token"})
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "RoleArn"}
    assert body["RoleArn"] == account.role_arn
    assert body["AccessKeyId"] == account.current().access_key_id


def sts_error(body: str) -> tuple[str | None, str | None]:
    error = ET.fromstring(body).find(f"{STS_NS}Error")
    assert error is not None
    return error.findtext(f"{STS_NS}Code"), error.findtext(f"{STS_NS}Message")


async def test_aws_sts_rejects_bad_requests(
    account: FakeAwsAccount, clock: Clock, aiohttp_client: ClientFactory
) -> None:
    issuer = FakeOidcIssuer()
    client = await aiohttp_client(FakeAwsSts(account, issuer=issuer, now=clock).app())
    good = {
        "Action": "AssumeRoleWithWebIdentity",
        "Version": "2011-06-15",
        "RoleArn": account.role_arn,
        "RoleSessionName": "s1",
        "WebIdentityToken": issuer.mint("sts.amazonaws.com", now=clock()),
    }
    cases: list[tuple[dict[str, str | None], int, str, str]] = [
        (
            {"WebIdentityToken": None},
            400,
            "ValidationError",
            "1 validation error detected: Value null at 'webIdentityToken' failed to satisfy constraint: "
            "Member must not be null",
        ),
        (
            {"WebIdentityToken": "", "RoleArn": ""},
            400,
            "ValidationError",
            "2 validation errors detected: Value '' at 'roleArn' failed to satisfy constraint: Member must "
            "have length greater than or equal to 20; Value '' at 'webIdentityToken' failed to satisfy "
            "constraint: Member must have length greater than or equal to 4",
        ),
        (
            {"RoleArn": "arn:aws:iam::123456789012:role/other"},
            403,
            "AccessDenied",
            "Not authorized to perform sts:AssumeRoleWithWebIdentity",
        ),
        ({"Action": "AssumeRole"}, 400, "InvalidAction", ""),
        # GetCallerIdentity exists but must be SigV4-signed, as on AWS.
        ({"Action": "GetCallerIdentity"}, 403, "MissingAuthenticationToken", "Request is missing"),
        (
            {"WebIdentityToken": issuer.mint("other-aud", now=clock())},
            400,
            "InvalidIdentityToken",
            "Incorrect token audience",
        ),
        (
            {"WebIdentityToken": FakeOidcIssuer().mint("sts.amazonaws.com", now=clock())},
            400,
            "InvalidIdentityToken",
            "",
        ),
    ]
    for overrides, status, code, message in cases:
        form = {k: v for k, v in {**good, **overrides}.items() if v is not None}
        resp = await client.post("/", data=form)
        assert resp.status == status, overrides
        assert resp.content_type == "text/xml"
        got_code, got_message = sts_error(await resp.text())
        assert got_code == code
        assert got_message is not None
        assert message in got_message
    resp = await client.post("/", data=good)
    assert resp.status == 200
    result = ET.fromstring(await resp.text()).find(f"{STS_NS}AssumeRoleWithWebIdentityResult")
    assert result is not None
    assert result.findtext(f"{STS_NS}AssumedRoleUser/{STS_NS}Arn") == account.assumed_role_arn("s1")
    key = result.findtext(f"{STS_NS}Credentials/{STS_NS}AccessKeyId")
    assert key is not None
    issued = account.lookup(key)
    assert issued is not None
    assert result.findtext(f"{STS_NS}Credentials/{STS_NS}SessionToken") == issued.session_token
    assert result.findtext(f"{STS_NS}Credentials/{STS_NS}Expiration") == issued.expiration
    assert issued.expires_at == clock() + 3600
    assert result.findtext(f"{STS_NS}SubjectFromWebIdentityToken") is not None


# --- Google STS verifying AWS subject tokens -------------------------------------------------


def sign(
    creds: ReadOnlyCredentials,
    *,
    region: str = "us-east-2",
    url_region: str | None = None,
    target: str | None = AUDIENCE,
    unsigned_target: str | None = None,
) -> AWSRequest:
    """A GetCallerIdentity request signed by botocore, as the broker builds it."""
    host = f"sts.{url_region or region}.amazonaws.com"
    headers = {"Host": host}
    if target is not None:
        headers[TARGET] = target
    request = AWSRequest(
        method="POST", url=f"https://{host}?Action=GetCallerIdentity&Version=2011-06-15", headers=headers
    )
    SigV4Auth(creds, "sts", region).add_auth(request)
    if unsigned_target is not None:
        request.headers[TARGET] = unsigned_target  # google-auth adds it after signing
    return request


def serialize(request: AWSRequest, *, go_style: bool = False) -> str:
    headers = [{"key": k, "value": v} for k, v in request.headers.items()]
    token = {"url": request.url, "method": request.method, "headers": headers}
    if go_style:  # go-oauth2: canonical header names, url.QueryEscape (spaces as '+', '/' as %2F)
        token["headers"] = [{"key": h["key"].title(), "value": h["value"]} for h in headers]
        return quote_plus(json.dumps(token))
    return quote(json.dumps(token, separators=(",", ":"), sort_keys=True))


def frozen(issued: AwsCredentials) -> ReadOnlyCredentials:
    return ReadOnlyCredentials(issued.access_key_id, issued.secret_access_key, issued.session_token)


def aws_form(subject_token: str, audience: str = AUDIENCE) -> dict[str, str]:
    return {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "audience": audience,
        "scope": "https://www.googleapis.com/auth/cloud-platform",
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "subject_token": subject_token,
        "subject_token_type": AWS4,
    }


@pytest.fixture
def google_sts(account: FakeAwsAccount, clock: Clock) -> FakeSts:
    sts = FakeSts(FakeOidcIssuer(), AUDIENCE, now=clock)
    accept_aws(sts, account)
    return sts


@pytest.fixture
async def sts_client(google_sts: FakeSts, aiohttp_client: ClientFactory) -> Client:
    return await aiohttp_client(google_sts.app())


@pytest.mark.parametrize("style", ["google-auth", "go"])
async def test_sts_accepts_botocore_signed_token(
    style: str, google_sts: FakeSts, sts_client: Client, account: FakeAwsAccount
) -> None:
    token = serialize(sign(frozen(account.current())), go_style=style == "go")
    resp = await sts_client.post("/v1/token", data=aws_form(token))
    assert resp.status == 200, await resp.text()
    issued = google_sts.lookup((await resp.json())["access_token"])
    assert issued is not None
    assert issued.subject == "arn:aws:sts::123456789012:assumed-role/wif-broker-role/i-0123456789abcdef0"


async def test_sts_accepts_https_audience_and_rotated_keys(
    sts_client: Client, account: FakeAwsAccount
) -> None:
    old = account.current()
    account.rotate()
    for creds in (old, account.current()):
        token = serialize(sign(frozen(creds), target="https:" + AUDIENCE))
        resp = await sts_client.post("/v1/token", data=aws_form(token))
        assert resp.status == 200, await resp.text()


def _aws_error(code: str, message: str) -> str:
    return f"Received invalid AWS response of type {code} with error message: {message}"


MISMATCH = _aws_error(
    "SignatureDoesNotMatch",
    "The request signature we calculated does not match the signature you provided. Check your AWS "
    "Secret Access Key and signing method. Consult the service documentation for details.",
)
INVALID_KEY = _aws_error("InvalidClientTokenId", "The security token included in the request is invalid.")


def _tampered(request: AWSRequest) -> AWSRequest:
    auth = request.headers["Authorization"]
    request.headers.replace_header("Authorization", auth[:-1] + ("0" if auth[-1] != "0" else "1"))
    return request


@pytest.mark.parametrize(
    ("case", "error", "description"),
    [
        ("tampered_signature", "invalid_grant", MISMATCH),
        ("wrong_secret", "invalid_grant", MISMATCH),
        (
            "unsigned_target_resource",
            "invalid_grant",
            f"The {TARGET} header must be signed: list it in the SignedHeaders of the AWS request.",
        ),
        ("stale_date", "invalid_grant", "Signature expired: "),
        ("future_date", "invalid_grant", "Signature not yet current: "),
        ("unknown_key", "invalid_grant", INVALID_KEY),
        ("wrong_session_token", "invalid_grant", INVALID_KEY),
        ("revoked_key", "invalid_grant", INVALID_KEY),
        ("expired_key", "invalid_grant", "type ExpiredToken"),
        ("wrong_audience_header", "invalid_grant", f"The target resource in the {TARGET} header ["),
        (
            "region_mismatch",
            "invalid_grant",
            "Credential should be scoped to a valid region, not 'us-west-2'.",
        ),
        ("global_endpoint", "invalid_request", "is not https://sts.<region>.amazonaws.com?Action="),
        ("not_json", "invalid_request", "it is not a URL-encoded JSON object."),
        ("get_method", "invalid_request", "\"method\" must be POST, not 'GET'."),
    ],
)
async def test_sts_rejects_bad_aws_tokens(
    case: str,
    error: str,
    description: str,
    google_sts: FakeSts,
    sts_client: Client,
    account: FakeAwsAccount,
    clock: Clock,
) -> None:
    creds = frozen(account.current())
    request: AWSRequest | None = None
    token: str | None = None
    if case == "tampered_signature":
        request = _tampered(sign(creds))
    elif case == "wrong_secret":
        request = sign(creds._replace(secret_key="not-the-secret"))
    elif case == "unsigned_target_resource":
        request = sign(creds, target=None, unsigned_target=AUDIENCE)
    elif case == "stale_date":
        request = sign(creds)
        clock.t += 16 * 60
    elif case == "future_date":
        request = sign(creds)
        clock.t -= 16 * 60
    elif case == "unknown_key":
        request = sign(creds._replace(access_key="ASIAUNKNOWNKEY000000"))
    elif case == "wrong_session_token":
        request = sign(creds._replace(token="other-token"))
    elif case == "revoked_key":
        account.rotate(revoke=True)
        request = sign(creds)
    elif case == "expired_key":
        request = sign(frozen(account.issue(lifetime_seconds=0)))
    elif case == "wrong_audience_header":
        request = sign(creds, target=AUDIENCE.replace("/aws", "/other"))
    elif case == "region_mismatch":
        request = sign(creds, region="us-west-2", url_region="us-east-2")
    elif case == "global_endpoint":
        request = sign(creds)
        request.url = "https://sts.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15"
    elif case == "not_json":
        token = "not%20json"
    elif case == "get_method":
        request = sign(creds)
        request.method = "GET"
    if request is not None:
        token = serialize(request)
    assert token is not None
    resp = await sts_client.post("/v1/token", data=aws_form(token))
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == error
    assert description in body["error_description"]
    assert google_sts.issued == {}


async def test_aws_subject_type_needs_an_account(
    google_sts: FakeSts, sts_client: Client, account: FakeAwsAccount
) -> None:
    token = serialize(sign(frozen(account.current())))
    accept_aws(google_sts, None)
    resp = await sts_client.post("/v1/token", data=aws_form(token))
    assert (resp.status, (await resp.json())["error"]) == (400, "invalid_request")
    accept_aws(google_sts, account)
    resp = await sts_client.post("/v1/token", data=aws_form(token))
    assert resp.status == 200


# --- token-chain.md D.3 vectors: the verifier agrees with known-good signatures ---------------

VECTOR_TIME = datetime(2020, 8, 11, 6, 55, 22)
VECTOR_CREDS = ReadOnlyCredentials(
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AQoEXAMPLEH4aoAH0gNCAPyJxz4BlCFFxWNE1OPTgk5TthT+FvwqnKwRcOIfrRh3c/LTo6UDdyJwOOvEVPvLXCrrrUtdnniCEXAMPLE"
    "/IvU1dYUg2RVAJBanLiHb4IgRmpRV3zrkuWJOgQs8IZZaIv2BXIa2R4OlgkBN9bkUDNCJiBeb/AXlzBBko7b15fjrBs2+cTQtpZ3C"
    "YWFXG8C5zqx37wnOE49mRl/+OtkIKGO7fAE",
)
VECTOR_AUDIENCE = (
    "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/POOL_ID"
    "/providers/PROVIDER_ID"
)
VECTOR_PREFIX = (
    "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20200811/us-east-2/sts/aws4_request, SignedHeaders="
)
VECTOR_1 = "596aa990b792d763465d73703e684ca273c45536c6d322c31be01a41d02e5b60"
VECTOR_3 = "460b491cd92b746345219747e679bf55541e3f8bb18eb11516305dbecded91b8"


def vector_request(*, sign_target: bool) -> AWSRequest:
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=VECTOR_TIME):
        if sign_target:
            return sign(VECTOR_CREDS, target=VECTOR_AUDIENCE)
        return sign(VECTOR_CREDS, target=None, unsigned_target=VECTOR_AUDIENCE)


@pytest.fixture
async def vector_sts(aiohttp_client: ClientFactory) -> tuple[FakeSts, Client]:
    clock = Clock(float(calendar.timegm(VECTOR_TIME.timetuple())) + 60)
    account = FakeAwsAccount(now=clock)
    account.register(
        AwsCredentials(
            access_key_id="AKIAIOSFODNN7EXAMPLE",
            secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            session_token=VECTOR_CREDS.token,
            issued_at=clock() - 600,
            expires_at=clock() + 3600,
            arn="arn:aws:sts::123456789012:assumed-role/vector/session",
            role_arn="arn:aws:iam::123456789012:role/vector",
        )
    )
    sts = FakeSts(FakeOidcIssuer(), VECTOR_AUDIENCE, now=clock)
    accept_aws(sts, account)
    return sts, await aiohttp_client(sts.app())


async def test_vector_1_google_auth_style(vector_sts: tuple[FakeSts, Client]) -> None:
    request = vector_request(sign_target=False)
    assert request.headers["Authorization"] == (
        f"{VECTOR_PREFIX}host;x-amz-date;x-amz-security-token, Signature={VECTOR_1}"
    )
    parsed = parse_aws_subject_token(serialize(request))
    assert parsed.signed_headers == ("host", "x-amz-date", "x-amz-security-token")
    assert sigv4_signature(parsed, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY") == VECTOR_1
    # The signature is right; this fake refuses it only because the target resource is unsigned.
    sts, client = vector_sts
    resp = await client.post("/v1/token", data=aws_form(serialize(request), VECTOR_AUDIENCE))
    assert resp.status == 400
    assert "must be signed" in (await resp.json())["error_description"]
    assert sts.issued == {}


async def test_vector_3_signed_target_resource(vector_sts: tuple[FakeSts, Client]) -> None:
    request = vector_request(sign_target=True)
    assert request.headers["Authorization"] == (
        f"{VECTOR_PREFIX}host;x-amz-date;x-amz-security-token;x-goog-cloud-target-resource, "
        f"Signature={VECTOR_3}"
    )
    parsed = parse_aws_subject_token(serialize(request))
    assert sigv4_signature(parsed, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY") == VECTOR_3
    sts, client = vector_sts
    resp = await client.post("/v1/token", data=aws_form(serialize(request), VECTOR_AUDIENCE))
    assert resp.status == 200, await resp.text()
    issued = sts.lookup((await resp.json())["access_token"])
    assert issued is not None
    assert issued.subject == "arn:aws:sts::123456789012:assumed-role/vector/session"

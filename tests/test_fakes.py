"""The fake Google services reject what the real ones reject, over real HTTP.

Each assertion pins an exact status and body: the broker's error mapping is
tested against these fakes, so a fake that drifted into leniency would hide
broker bugs.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from google.auth import jwt

from broker.fakes import FakeGoogle
from broker.fakes.google import FakeIam, FakeSts
from broker.fakes.oidc import FakeGoogleSigner, FakeOidcIssuer
from broker.fakes.sts import INVALID_TARGET

AUDIENCE = "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/pool/providers/prov"
SA = "app@proj.iam.gserviceaccount.com"
IAM_SCOPE = "https://www.googleapis.com/auth/iam"
CLOUD = "https://www.googleapis.com/auth/cloud-platform"
FORM = "application/x-www-form-urlencoded"

Client = TestClient[Any, Any]
ClientFactory = Callable[..., Awaitable[Client]]


class Clock:
    def __init__(self) -> None:
        self.t = float(int(time.time()))

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def issuer() -> FakeOidcIssuer:
    return FakeOidcIssuer()


@pytest.fixture
def sts(issuer: FakeOidcIssuer, clock: Clock) -> FakeSts:
    return FakeSts(issuer, AUDIENCE, now=clock)


@pytest.fixture
def iam(sts: FakeSts, clock: Clock) -> FakeIam:
    return FakeIam(sts, {SA}, now=clock)


@pytest.fixture
async def sts_client(sts: FakeSts, aiohttp_client: ClientFactory) -> Client:
    return await aiohttp_client(sts.app())


@pytest.fixture
async def iam_client(iam: FakeIam, aiohttp_client: ClientFactory) -> Client:
    return await aiohttp_client(iam.app())


def exchange_form(subject_token: str, **overrides: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "audience": AUDIENCE,
        "scope": IAM_SCOPE,
        "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "subject_token": subject_token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        **overrides,
    }
    return {k: v for k, v in form.items() if v is not None}


async def post_sts(client: Client, form: dict[str, str], **kwargs: Any) -> aiohttp.ClientResponse:
    return await client.post("/v1/token", data=form, **kwargs)


async def federated_token(
    sts_client: Client, issuer: FakeOidcIssuer, clock: Clock, scope: str = IAM_SCOPE
) -> str:
    resp = await post_sts(sts_client, exchange_form(issuer.mint(AUDIENCE, now=clock()), scope=scope))
    assert resp.status == 200, await resp.text()
    token: str = (await resp.json())["access_token"]
    return token


def iam_path(method: str, email: str = SA, project: str = "-") -> str:
    return f"/v1/projects/{project}/serviceAccounts/{email}:{method}"


async def post_iam(
    client: Client, method: str, body: Any, token: str | None, email: str = SA, **kwargs: Any
) -> aiohttp.ClientResponse:
    headers: dict[str, str] = {"Authorization": f"Bearer {token}"} if token is not None else {}
    headers.update(kwargs.pop("headers", {}))
    return await client.post(iam_path(method, email), json=body, headers=headers, **kwargs)


def oauth(error: str, description: str) -> dict[str, str]:
    return {"error": error, "error_description": description}


async def test_happy_path_sts_then_access_and_id_tokens(
    sts: FakeSts, iam: FakeIam, sts_client: Client, iam_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    resp = await post_sts(sts_client, exchange_form(issuer.mint(AUDIENCE, now=clock())))
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in"}
    assert body["access_token"].startswith("ya29.fake-sts-")
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert (body["token_type"], body["expires_in"]) == ("Bearer", 3600)
    issued = sts.lookup(body["access_token"])
    assert issued is not None
    assert (issued.scopes, issued.subject) == ((IAM_SCOPE,), "system:serviceaccount:default:app")
    assert body["access_token"] not in repr(issued)
    assert sts.calls[0].form is not None
    assert sts.calls[0].form["audience"] == AUDIENCE

    resp = await post_iam(
        iam_client,
        "generateAccessToken",
        {"delegates": None, "scope": [CLOUD], "lifetime": "3600s"},
        body["access_token"],
    )
    assert resp.status == 200, await resp.text()
    access = await resp.json()
    assert set(access) == {"accessToken", "expireTime"}
    assert access["accessToken"] in iam.issued_access
    assert access["expireTime"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock() + 3600))

    resp = await post_iam(
        iam_client,
        "generateIdToken",
        {"audience": "https://svc.example", "delegates": None, "includeEmail": True},
        body["access_token"],
        headers={
            "Authorization": f"Bearer {body['access_token']}",
            "Content-Type": "text/json; charset=utf-8",
        },
    )
    assert resp.status == 200, await resp.text()
    id_token = (await resp.json())["token"]
    assert iam.calls[-1].headers["content-type"] == "text/json; charset=utf-8"
    assert iam.issued_id == [id_token]
    claims = jwt.decode(id_token, verify=False)
    assert claims["aud"] == "https://svc.example"
    assert claims["iss"] == "https://accounts.google.com"
    assert (claims["email"], claims["email_verified"]) == (SA, True)
    assert claims["azp"] == claims["sub"]
    assert re.fullmatch(r"\d{21}", claims["sub"])
    assert claims["exp"] - claims["iat"] == 3600
    # The signature is real: google-auth verifies it with the signer's key.
    verified = jwt.decode(id_token, certs=iam.google_signer.public_key_pem, audience="https://svc.example")
    assert verified["sub"] == claims["sub"]


async def test_id_token_without_include_email_has_no_email(
    sts_client: Client, iam_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    token = await federated_token(sts_client, issuer, clock, scope=CLOUD)
    resp = await post_iam(iam_client, "generateIdToken", {"audience": "aud-x"}, token)
    assert resp.status == 200
    claims = jwt.decode((await resp.json())["token"], verify=False)
    assert "email" not in claims
    assert "email_verified" not in claims
    assert claims["aud"] == "aud-x"


async def test_https_form_of_audience_and_both_option_encodings_are_accepted(
    sts: FakeSts, sts_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    options = json.dumps({"userProject": "123"})
    for encoded in (options, quote(options)):
        form = exchange_form(issuer.mint("https:" + AUDIENCE, now=clock()), options=encoded)
        resp = await post_sts(sts_client, form)
        assert resp.status == 200, await resp.text()
        issued = sts.lookup((await resp.json())["access_token"])
        assert issued is not None
        assert issued.options == {"userProject": "123"}


def _expired(issuer: FakeOidcIssuer, now: float) -> str:
    return issuer.mint(AUDIENCE, lifetime_seconds=600, now=now - 700)


STALE = "ID Token issued at {iat} is stale to sign-in."


@pytest.mark.parametrize(
    ("case", "error", "description"),
    [
        ("wrong_audience", "invalid_target", INVALID_TARGET),
        ("missing_subject_token", "invalid_request", 'The "subject_token" parameter is required.'),
        ("missing_audience", "invalid_request", 'The "audience" parameter is required.'),
        ("missing_scope", "invalid_request", 'The "scope" parameter is required.'),
        ("bad_grant_type", "unsupported_grant_type", "Invalid value for \"grant_type\": 'password'."),
        ("bad_requested_type", "invalid_request", 'Invalid value for "requested_token_type".'),
        (
            "aws_subject_type",
            "invalid_request",
            "Invalid value for \"subject_token_type\": 'urn:ietf:params:aws:token-type:aws4_request'.",
        ),
        ("expired", "invalid_grant", STALE),
        ("future_iat", "invalid_grant", "ID Token issued at {iat} is in the future."),
        ("lifetime_48h", "invalid_grant", "The ID Token lifetime (exp - iat) must be less than 48 hours."),
        (
            "token_aud_mismatch",
            "invalid_grant",
            "The audience in ID Token [https://other.example] does not match the expected audience.",
        ),
        ("bad_signature", "invalid_grant", "Unable to verify the ID Token: JWT signature does not verify."),
        ("garbage", "invalid_grant", "Unable to verify the ID Token: expected 3 JWT segments, got 1."),
        ("wrong_issuer", "invalid_grant", "The issuer in ID Token [https://evil.example] is not trusted."),
        (
            "bearer_header",
            "invalid_request",
            "Do not send an Authorization Bearer header to the token endpoint.",
        ),
        (
            "json_body",
            "invalid_request",
            "The request must use Content-Type application/x-www-form-urlencoded.",
        ),
        ("bad_options", "invalid_request", 'Invalid value for "options". It must be a JSON object.'),
    ],
)
async def test_sts_rejections(
    case: str,
    error: str,
    description: str,
    sts: FakeSts,
    sts_client: Client,
    issuer: FakeOidcIssuer,
    clock: Clock,
) -> None:
    now = clock()
    good = issuer.mint(AUDIENCE, now=now)
    kwargs: dict[str, Any] = {}
    iat = int(now)
    subject_tokens = {
        "expired": _expired(issuer, now),
        "future_iat": issuer.mint(AUDIENCE, now=now + 600),
        "lifetime_48h": issuer.mint(AUDIENCE, lifetime_seconds=48 * 3600, now=now),
        "token_aud_mismatch": issuer.mint("https://other.example", now=now),
        # Same kid, different key: only the signature is wrong.
        "bad_signature": FakeOidcIssuer().mint(AUDIENCE, now=now),
        "garbage": "not-a-jwt",
        "wrong_issuer": issuer.mint(AUDIENCE, now=now, extra_claims={"iss": "https://evil.example"}),
    }
    form = exchange_form(subject_tokens.get(case, good))
    if case == "expired":
        iat = int(now) - 700
    elif case == "future_iat":
        iat = int(now) + 600
    elif case == "wrong_audience":
        form["audience"] = AUDIENCE.replace("prov", "other")
    elif case.startswith("missing_"):
        del form[case.removeprefix("missing_")]
    elif case == "bad_grant_type":
        form["grant_type"] = "password"
    elif case == "bad_requested_type":
        form["requested_token_type"] = "urn:ietf:params:oauth:token-type:id_token"
    elif case == "aws_subject_type":
        form["subject_token_type"] = "urn:ietf:params:aws:token-type:aws4_request"
    elif case == "bearer_header":
        kwargs["headers"] = {"Authorization": "Bearer ya29.something"}
    elif case == "bad_options":
        form["options"] = "%%not json"

    if case == "json_body":
        resp = await sts_client.post("/v1/token", json=form)
    else:
        resp = await post_sts(sts_client, form, **kwargs)
    assert resp.status == 400
    assert await resp.json() == oauth(error, description.format(iat=iat))
    assert sts.issued == {}
    assert len(sts.calls) == 1


async def test_basic_client_auth_is_allowed_on_sts(
    sts_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    form = exchange_form(issuer.mint(AUDIENCE, now=clock()))
    resp = await post_sts(sts_client, form, headers={"Authorization": "Basic Y2xpZW50OnNlY3JldA=="})
    assert resp.status == 200


SEE = (
    "Expected OAuth 2 access token, login cookie or other valid authentication credential. "
    "See https://developers.google.com/identity/sign-in/web/devconsole-project."
)


async def test_iam_without_bearer_is_401(iam_client: Client) -> None:
    resp = await post_iam(iam_client, "generateAccessToken", {"scope": [CLOUD]}, None)
    assert resp.status == 401
    error = (await resp.json())["error"]
    assert (error["code"], error["status"]) == (401, "UNAUTHENTICATED")
    assert error["message"] == f"Request is missing required authentication credential. {SEE}"


@pytest.mark.parametrize("token", ["ya29.unknown", "expired"])
async def test_iam_with_unknown_or_expired_token_is_401(
    token: str, sts_client: Client, iam_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    if token == "expired":
        token = await federated_token(sts_client, issuer, clock)
        clock.t += 3600
    resp = await post_iam(iam_client, "generateAccessToken", {"scope": [CLOUD]}, token)
    assert resp.status == 401
    error = (await resp.json())["error"]
    assert (error["code"], error["status"]) == (401, "UNAUTHENTICATED")
    assert error["message"] == f"Request had invalid authentication credentials. {SEE}"
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_iam_insufficient_scope_is_403(
    sts_client: Client, iam_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    token = await federated_token(
        sts_client, issuer, clock, scope="https://www.googleapis.com/auth/devstorage.read_only"
    )
    resp = await post_iam(iam_client, "generateAccessToken", {"scope": [CLOUD]}, token)
    assert resp.status == 403
    assert await resp.json() == {
        "error": {
            "code": 403,
            "message": "Request had insufficient authentication scopes.",
            "status": "PERMISSION_DENIED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                    "domain": "googleapis.com",
                    "metadata": {
                        "service": "iamcredentials.googleapis.com",
                        "method": "google.iam.credentials.v1.IAMCredentials.GenerateAccessToken",
                    },
                }
            ],
        }
    }


@pytest.mark.parametrize(
    ("method", "body", "permission"),
    [
        ("generateAccessToken", {"scope": [CLOUD]}, "iam.serviceAccounts.getAccessToken"),
        ("generateIdToken", {"audience": "x"}, "iam.serviceAccounts.getOpenIdToken"),
    ],
)
async def test_iam_unknown_service_account_is_403(
    method: str,
    body: dict[str, Any],
    permission: str,
    sts_client: Client,
    iam_client: Client,
    issuer: FakeOidcIssuer,
    clock: Clock,
) -> None:
    token = await federated_token(sts_client, issuer, clock)
    resp = await post_iam(iam_client, method, body, token, email="other@proj.iam.gserviceaccount.com")
    assert resp.status == 403
    assert await resp.json() == {
        "error": {
            "code": 403,
            "message": f"Permission '{permission}' denied on resource (or it may not exist).",
            "status": "PERMISSION_DENIED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "IAM_PERMISSION_DENIED",
                    "domain": "iam.googleapis.com",
                    "metadata": {"permission": permission},
                }
            ],
        }
    }


@pytest.mark.parametrize(
    ("method", "body", "message_start"),
    [
        ("generateAccessToken", {"scope": [CLOUD], "lifetime": "3600"}, "Invalid value at 'lifetime'"),
        ("generateAccessToken", {"scope": [CLOUD], "lifetime": 3600}, "Invalid value at 'lifetime'"),
        (
            "generateAccessToken",
            {"scope": [CLOUD], "lifetime": "3601s"},
            "Lifetime must be between 1s and 3600s",
        ),
        ("generateAccessToken", {"scope": [CLOUD], "lifetime": "0s"}, "Lifetime must be between"),
        ("generateAccessToken", {"scope": []}, "Invalid value at 'scope'"),
        ("generateAccessToken", {"scope": CLOUD}, "Invalid value at 'scope'"),
        ("generateAccessToken", {"lifetime": "60s"}, "Invalid value at 'scope'"),
        ("generateAccessToken", {"scopes": [CLOUD]}, 'Invalid JSON payload received. Unknown name "scopes"'),
        ("generateAccessToken", {"scope": [CLOUD], "delegates": "x"}, "Invalid value at 'delegates'"),
        ("generateAccessToken", [CLOUD], "Invalid JSON payload received. Expected a JSON object."),
        ("generateIdToken", {"includeEmail": True}, "Invalid value at 'audience'"),
        ("generateIdToken", {"audience": ""}, "Invalid value at 'audience'"),
        ("generateIdToken", {"audience": "a", "includeEmail": "yes"}, "Invalid value at 'include_email'"),
    ],
)
async def test_iam_invalid_bodies_are_400(
    method: str,
    body: Any,
    message_start: str,
    sts_client: Client,
    iam_client: Client,
    issuer: FakeOidcIssuer,
    clock: Clock,
) -> None:
    token = await federated_token(sts_client, issuer, clock)
    resp = await post_iam(iam_client, method, body, token)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert error["message"].startswith(message_start), error["message"]


async def test_iam_request_shape_errors(
    sts_client: Client, iam_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    token = await federated_token(sts_client, issuer, clock)
    auth = {"Authorization": f"Bearer {token}"}
    resp = await iam_client.post(
        iam_path("generateAccessToken", project="my-project"), json={"scope": [CLOUD]}, headers=auth
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["status"] == "INVALID_ARGUMENT"

    resp = await iam_client.post(iam_path("generateAccessToken"), data={"scope": CLOUD}, headers=auth)
    assert resp.status == 400
    assert (await resp.json())["error"][
        "message"
    ] == "Invalid request: Content-Type must be application/json."

    resp = await iam_client.post(iam_path("signBlob"), json={}, headers=auth)
    assert resp.status == 404
    assert (await resp.json())["error"]["status"] == "NOT_FOUND"


async def test_iam_lifetime_knob_caps_requested_lifetime(
    iam: FakeIam, sts_client: Client, iam_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    token = await federated_token(sts_client, issuer, clock)
    iam.lifetime_seconds = 600
    resp = await post_iam(iam_client, "generateAccessToken", {"scope": [CLOUD], "lifetime": "3600s"}, token)
    assert resp.status == 200
    assert (await resp.json())["expireTime"] == time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock() + 600)
    )


async def test_fail_next_answers_then_recovers(
    sts: FakeSts, sts_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    sts.fail_next(503, "upstream unavailable", count=2, headers={"Retry-After": "7"})
    form = exchange_form(issuer.mint(AUDIENCE, now=clock()))
    for _ in range(2):
        resp = await post_sts(sts_client, form)
        assert resp.status == 503
        assert await resp.text() == "upstream unavailable"
        assert resp.headers["Retry-After"] == "7"
    sts.fail_next(429, {"error": "rate_limited"})
    resp = await post_sts(sts_client, form)
    assert (resp.status, await resp.json()) == (429, {"error": "rate_limited"})
    resp = await post_sts(sts_client, form)
    assert resp.status == 200
    assert len(sts.calls) == 4
    assert len(sts.issued) == 1


async def test_gate_holds_requests_until_released(
    sts: FakeSts, sts_client: Client, issuer: FakeOidcIssuer, clock: Clock
) -> None:
    sts.gate = asyncio.Event()
    form = exchange_form(issuer.mint(AUDIENCE, now=clock()))
    tasks = [asyncio.create_task(post_sts(sts_client, form)) for _ in range(20)]
    for _ in range(200):
        if len(sts.calls) == 20:
            break
        await asyncio.sleep(0.01)
    assert len(sts.calls) == 20
    assert not any(t.done() for t in tasks)
    assert sts.issued == {}
    sts.gate.set()
    responses = await asyncio.gather(*tasks)
    assert [r.status for r in responses] == [200] * 20
    assert len(sts.issued) == 20


async def test_delay_seconds_delays_answers(sts: FakeSts, sts_client: Client) -> None:
    sts.delay_seconds = 0.2
    sts.fail_next(500, "x")
    start = time.monotonic()
    resp = await sts_client.post("/v1/token", data={})
    assert resp.status == 500
    assert time.monotonic() - start >= 0.2


def test_issuer_verify_rejects_tampering(issuer: FakeOidcIssuer) -> None:
    token = issuer.mint(AUDIENCE, now=1000)
    assert issuer.verify(token, now=1000)["aud"] == AUDIENCE
    header, _payload, signature = token.split(".")
    other_payload = FakeOidcIssuer().mint("https://other", now=1000).split(".")[1]
    with pytest.raises(ValueError, match="signature"):
        issuer.verify(f"{header}.{other_payload}.{signature}", now=1000)
    with pytest.raises(ValueError, match="kid"):
        issuer.verify(FakeOidcIssuer(kid="other").mint(AUDIENCE), now=1000)
    with pytest.raises(ValueError, match="JSON"):
        issuer.verify("e30.bm90anNvbg.c2ln", now=1000)
    assert FakeGoogleSigner().issuer == "https://accounts.google.com"
    jwt_header = jwt.decode_header(token)
    assert jwt_header == {"alg": "RS256", "typ": "JWT", "kid": "fake-oidc-1"}


async def test_fake_google_serves_both_services_on_loopback() -> None:
    google = FakeGoogle(service_accounts={SA})
    async with google, aiohttp.ClientSession() as session:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1/token", google.token_url)
        assert (
            google.impersonation_url(SA)
            == f"{google.iam_base_url}/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"
        )
        async with session.post(
            google.token_url, data=exchange_form(google.issuer.mint(AUDIENCE)) | {"audience": google.audience}
        ) as resp:
            assert resp.status == 400  # the subject token's aud is not this provider's
        form = exchange_form(google.subject_token()) | {"audience": google.audience}
        async with session.post(google.token_url, data=form) as resp:
            assert resp.status == 200
            sts_token = (await resp.json())["access_token"]
        async with session.post(
            google.impersonation_url(SA),
            json={"scope": [CLOUD]},
            headers={"Authorization": f"Bearer {sts_token}"},
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["accessToken"] in google.iam.issued_access
    with pytest.raises(RuntimeError, match="not running"):
        _ = google.token_url

"""The AWS subject token: botocore-signed GetCallerIdentity, serialised as STS expects.

Only botocore's clock is frozen (the one thing the vectors depend on).
"""

from __future__ import annotations

import datetime
import json
from unittest import mock
from urllib.parse import unquote

import botocore.auth

from broker.sources.aws import signed_subject_token
from broker.sources.awscreds import FrozenCredentials, region_from_zone

ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN = (
    "AQoEXAMPLEH4aoAH0gNCAPyJxz4BlCFFxWNE1OPTgk5TthT+FvwqnKwRcOIfrRh3c/LTo6UDdyJwOOvEVPvLXCrrrUtdnniCEXAMPLE/"
    "IvU1dYUg2RVAJBanLiHb4IgRmpRV3zrkuWJOgQs8IZZaIv2BXIa2R4OlgkBN9bkUDNCJiBeb/AXlzBBko7b15fjrBs2+cTQtpZ3CYWFXG8C5zqx37wnOE49mRl/+OtkIKGO7fAE"
)
URL = "https://sts.us-east-2.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
POOL = "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/POOL_ID"
AUDIENCE = POOL + "/providers/PROVIDER_ID"
FROZEN = datetime.datetime(2020, 8, 11, 6, 55, 22)


def sign() -> dict[str, object]:
    creds = FrozenCredentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY, TOKEN, "env")
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=FROZEN):
        token = signed_subject_token(creds, "us-east-2", URL, AUDIENCE)
    assert "%7B%22headers%22" in token, "the JSON must be URL-quoted"
    decoded: dict[str, object] = json.loads(unquote(token))
    return decoded


def test_signed_target_resource_matches_the_reference_vector() -> None:
    # token-chain.md §D.3 vector 3: x-goog-cloud-target-resource inside SignedHeaders.
    decoded = sign()
    headers = {h["key"].lower(): h["value"] for h in decoded["headers"]}  # type: ignore[attr-defined]
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20200811/us-east-2/sts/aws4_request, "
        "SignedHeaders=host;x-amz-date;x-amz-security-token;x-goog-cloud-target-resource, "
        "Signature=460b491cd92b746345219747e679bf55541e3f8bb18eb11516305dbecded91b8"
    )
    assert headers["host"] == "sts.us-east-2.amazonaws.com"
    assert headers["x-amz-date"] == "20200811T065522Z"
    assert headers["x-amz-security-token"] == TOKEN
    assert headers["x-goog-cloud-target-resource"] == AUDIENCE
    assert decoded["url"] == URL
    assert decoded["method"] == "POST"
    assert set(decoded) == {"url", "method", "headers"}


def test_every_exchange_is_signed_afresh() -> None:
    creds = FrozenCredentials(ACCESS_KEY_ID, SECRET_ACCESS_KEY, None, "env")
    first = signed_subject_token(creds, "us-east-2", URL, AUDIENCE)
    with mock.patch.object(
        botocore.auth,
        "get_current_datetime",
        return_value=datetime.datetime.now(datetime.UTC).replace(tzinfo=None) + datetime.timedelta(seconds=2),
    ):
        second = signed_subject_token(creds, "us-east-2", URL, AUDIENCE)
    assert first != second
    assert "x-amz-security-token" not in unquote(first).lower()


def test_region_from_zone_handles_local_zones() -> None:
    assert region_from_zone("us-east-2b") == "us-east-2"
    assert region_from_zone("us-west-2-lax-1a") == "us-west-2"
    assert region_from_zone("us-gov-west-1a") == "us-gov-west-1"
    assert region_from_zone("ap-northeast-1d") == "ap-northeast-1"

"""FakeAwsSts ``GetCallerIdentity``: SigV4-verified with the account's secrets, real XML back.

botocore's own STS client (what ``describe()`` and ``wif-broker check`` use)
must parse the answer, and anything AWS would refuse is refused with AWS's
error code: no signature, an unknown or revoked key, the wrong secret, an
expired session.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import botocore.exceptions
import botocore.session
import pytest
from aiohttp.test_utils import TestClient
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from tests.fakes.aws import AwsCredentials, FakeAws, FakeAwsAccount, FakeAwsSts

NS = "{https://sts.amazonaws.com/doc/2011-06-15/}"
QUERY = "Action=GetCallerIdentity&Version=2011-06-15"
Client = TestClient[Any, Any]


@pytest.fixture
async def aws() -> AsyncIterator[FakeAws]:
    async with FakeAws() as fake:
        yield fake


def identity(creds: AwsCredentials, endpoint: str, secret: str | None = None) -> dict[str, Any]:
    client: Any = botocore.session.get_session().create_client(
        "sts",
        region_name="eu-west-1",
        endpoint_url=endpoint,
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=secret or creds.secret_access_key,
        aws_session_token=creds.session_token,
    )
    result: dict[str, Any] = client.get_caller_identity()
    return result


async def test_botocore_gets_the_assumed_role_arn(aws: FakeAws) -> None:
    creds = aws.account.current()
    result = await asyncio.to_thread(identity, creds, aws.sts_url)
    assert result["Arn"] == "arn:aws:sts::123456789012:assumed-role/wif-broker-role/i-0123456789abcdef0"
    assert result["Account"] == "123456789012"
    assert result["UserId"] == f"{aws.account.role_id}:i-0123456789abcdef0"
    (call,) = aws.sts.calls
    assert call.form == {"Action": "GetCallerIdentity", "Version": "2011-06-15"}
    assert "x-amz-security-token" in call.headers["authorization"]


@pytest.mark.parametrize("problem", ["wrong-secret", "revoked", "expired"])
async def test_what_aws_would_refuse_is_refused(problem: str, aws: FakeAws) -> None:
    creds = aws.account.current()
    secret = None
    expected = {"wrong-secret": "SignatureDoesNotMatch", "revoked": "InvalidClientTokenId"}
    if problem == "wrong-secret":
        secret = creds.secret_access_key[::-1]
    elif problem == "revoked":
        aws.account.revoke(creds.access_key_id)
    else:
        creds = aws.account.issue(lifetime_seconds=-1)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        await asyncio.to_thread(identity, creds, aws.sts_url, secret)
    assert caught.value.response["Error"]["Code"] == expected.get(problem, "ExpiredToken")


async def test_query_string_form_and_missing_signature(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    account = FakeAwsAccount()
    client = await aiohttp_client(FakeAwsSts(account).app())
    creds = account.current()
    url = str(client.make_url("/")) + "?" + QUERY
    request = AWSRequest(method="GET", url=url)
    frozen = ReadOnlyCredentials(creds.access_key_id, creds.secret_access_key, creds.session_token)
    SigV4Auth(frozen, "sts", "us-east-2").add_auth(request)
    resp = await client.get("/?" + QUERY, headers=dict(request.headers.items()))
    assert resp.status == 200, await resp.text()
    root = ET.fromstring(await resp.text())
    assert root.tag == f"{NS}GetCallerIdentityResponse"
    assert root.findtext(f"{NS}GetCallerIdentityResult/{NS}Arn") == creds.arn

    resp = await client.post("/", data={"Action": "GetCallerIdentity", "Version": "2011-06-15"})
    assert resp.status == 403
    assert ET.fromstring(await resp.text()).findtext(f"{NS}Error/{NS}Code") == "MissingAuthenticationToken"

"""AWS failures are classified and explained, by the token endpoint and by ``wif-broker check``.

A client asking the broker for a token gets the failing step, the reason and
the fix in the body (503 while worth retrying, 403 once Google refused); the
same chain run by ``wif-broker check`` prints what each step saw. The success
case shows what an operator needs for the IAM binding: region, provider,
principal ARN and the ``principalSet://…/attribute.aws_role/…`` member.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from broker.fakes import FakeGoogle
from broker.fakes.oidc import FakeOidcIssuer
from tests.aws._harness import (
    broker_settings,
    credential_info,
    described_broker,
    principal_set,
    token_response,
    upstream_aws_calls,
)
from tests.clients._subproc import check_process
from tests.fakes.aws import ISOLATED_ENV, FakeAws, FakeAwsAccount, FakeImds, accept_aws

ROLE = "arn:aws:sts::123456789012:assumed-role/wif-broker-role"
TRIED = (
    "tried env, web identity (EKS IRSA), container (ECS task role / EKS Pod Identity), EC2 instance metadata."
)
HOP_LIMIT = "--http-put-response-hop-limit 2"


class HopLimitedImds(FakeImds):
    """IMDS seen from a container behind one hop too many: the token PUT never gets an answer."""

    def __init__(self, account: FakeAwsAccount) -> None:
        super().__init__(account)
        self.release = asyncio.Event()

    async def _token(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return await super()._token(request)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def google() -> AsyncIterator[FakeGoogle]:
    async with FakeGoogle() as fake:
        yield fake


def setenv(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in {**ISOLATED_ENV, "AWS_REGION": "us-east-2", **env}.items():
        monkeypatch.setenv(key, value)


def write_credentials(tmp_path: Path, google: FakeGoogle, metadata_base: str) -> Path:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(credential_info(google, metadata_base)))
    return path


async def broker_answer(cred_file: Path) -> tuple[int, str]:
    async with described_broker(broker_settings(cred_file)) as (broker, _):
        return await token_response(broker)


async def test_check_shows_region_provider_principal_and_member(
    google: FakeGoogle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeAws() as aws:
        accept_aws(google.sts, aws.account)
        setenv(monkeypatch, {**aws.imds_env(), "AWS_ENDPOINT_URL_STS": aws.sts_url})
        result = await check_process(write_credentials(tmp_path, google, aws.imds_url))
    assert result.returncode == 0, result.describe()
    lines = result.stdout.splitlines()
    principal = f"{ROLE}/i-0123456789abcdef0"
    identity = f"ok    native identity (aws): region=us-east-2 provider=iam-role principal={principal}"
    assert identity in lines, result.describe()
    member = principal_set(google, ROLE)
    assert f"      bind roles/iam.workloadIdentityUser to: {member}" in lines, result.describe()
    assert "ok    subject token (aws) obtained" in lines, result.describe()
    assert any(line.startswith("ok    STS token exchange") for line in lines), result.describe()
    assert any(line.startswith("ok    generateAccessToken") for line in lines), result.describe()
    assert [issued.subject for issued in google.sts.issued.values()] == [principal]


async def test_no_credentials_lists_the_providers_tried(
    google: FakeGoogle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off AWS: nothing in env, no web identity, no container endpoint, and IMDS does not exist."""
    nowhere = f"http://127.0.0.1:{closed_port()}/"
    setenv(monkeypatch, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": nowhere})
    cred_file = write_credentials(tmp_path, google, nowhere)
    failures = upstream_aws_calls("transient")

    status, body = await broker_answer(cred_file)
    assert status == 503, body
    assert upstream_aws_calls("transient") > failures
    assert body.startswith(f"aws failed: no AWS credentials found; {TRIED}"), body
    assert "is unreachable (not on EC2)" in body, body
    assert "Fix: run with an IAM role" in body, body

    result = await check_process(cred_file)
    assert result.returncode == 1, result.describe()
    assert f"FAIL  native identity: no AWS credentials found; {TRIED}" in result.stdout, result.describe()
    assert "fix: run with an IAM role (task role, IRSA, Pod Identity or instance profile)" in result.stdout
    assert not google.sts.calls


async def test_imds_timeout_points_at_the_hop_limit(
    google: FakeGoogle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container on EC2 with IMDSv2's default hop limit of 1: the token PUT goes unanswered."""
    aws = FakeAws()
    aws.imds = imds = HopLimitedImds(aws.account)
    async with aws:
        try:
            setenv(monkeypatch, aws.imds_env())
            cred_file = write_credentials(tmp_path, google, aws.imds_url)

            status, body = await broker_answer(cred_file)
            assert status == 503, body
            assert f"no AWS credentials found; {TRIED}" in body, body
            assert "accepted the connection but did not answer in 1s" in body, body
            assert HOP_LIMIT in body, body

            result = await check_process(cred_file)
            assert result.returncode == 1, result.describe()
            assert "FAIL  native identity: no AWS credentials found" in result.stdout, result.describe()
            assert "fix: if this runs in a container on EC2, IMDSv2 needs a hop limit of 2" in result.stdout
            assert HOP_LIMIT in result.stdout, result.describe()
            assert {c.path for c in imds.calls if c.method == "PUT"} == {"/latest/api/token"}
        finally:
            imds.release.set()


@pytest.mark.parametrize("cause", ["revoked-key", "wrong-secret"])
async def test_sts_rejecting_the_signature_is_explained(
    cause: str, google: FakeGoogle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Google replays the signed GetCallerIdentity; AWS refuses it, and STS says so (invalid_grant)."""
    async with FakeAws() as aws:
        accept_aws(google.sts, aws.account)
        creds = aws.account.current()
        if cause == "revoked-key":
            setenv(monkeypatch, {**aws.imds_env(), "AWS_ENDPOINT_URL_STS": aws.sts_url})
            aws.account.revoke(creds.access_key_id)
            aws_code = "InvalidClientTokenId"
        else:
            assert creds.session_token is not None
            setenv(
                monkeypatch,
                {
                    "AWS_ACCESS_KEY_ID": creds.access_key_id,
                    "AWS_SECRET_ACCESS_KEY": creds.secret_access_key[::-1],
                    "AWS_SESSION_TOKEN": creds.session_token,
                    "AWS_EC2_METADATA_SERVICE_ENDPOINT": aws.imds_url,
                    "AWS_ENDPOINT_URL_STS": aws.sts_url,
                },
            )
            aws_code = "SignatureDoesNotMatch"
        cred_file = write_credentials(tmp_path, google, aws.imds_url)
        rejected = f"invalid_grant: Received invalid AWS response of type {aws_code}"

        status, body = await broker_answer(cred_file)
        assert status == 403, body
        assert body.startswith(f"sts failed (HTTP 400): {rejected}"), body

        result = await check_process(cred_file)
        assert result.returncode == 1, result.describe()
        assert f"principal=unknown (GetCallerIdentity failed: {aws_code})" in result.stdout, result.describe()
        assert f"FAIL  STS token exchange: {rejected}" in result.stdout, result.describe()
    assert not google.sts.issued


async def test_expired_credentials_are_explained(
    google: FakeGoogle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container endpoint keeps handing out credentials that have already expired."""
    async with FakeAws(FakeAwsAccount(lifetime_seconds=-60)) as aws:
        setenv(monkeypatch, aws.container_env())
        status, body = await broker_answer(write_credentials(tmp_path, google, aws.imds_url))
    assert status == 503, body
    assert body.startswith(
        "aws failed: AWS credentials expired and the provider (container-role) handed out no newer ones"
    ), body


async def test_irsa_refusal_is_explained(
    google: FakeGoogle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS STS refuses the projected token (here: signed by an issuer the account does not trust)."""
    async with FakeAws(issuer=FakeOidcIssuer()) as aws:
        token_file = tmp_path / "token"
        token_file.write_text(FakeOidcIssuer().mint("sts.amazonaws.com", subject="system:serviceaccount:x:y"))
        setenv(monkeypatch, aws.web_identity_env(str(token_file)))
        status, body = await broker_answer(write_credentials(tmp_path, google, aws.imds_url))
    assert status == 503, body
    assert body.startswith("aws failed: AssumeRoleWithWebIdentity refused: InvalidIdentityToken"), body
    assert "Fix: check the role's trust policy" in body, body

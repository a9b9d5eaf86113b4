"""The AWS source end to end, one test per environment, ending with real clients.

Each test starts FakeAws (IMDS, container endpoint, AWS STS) and FakeGoogle
(whose STS verifies the SigV4 signature with the account's secrets), writes the
same aws1 credential file, sets only the environment the platform would set,
runs the production daemon in-process, then runs the real ``gcloud`` and a
google-auth ``default()`` + ``refresh()`` with no AWS variables at all. botocore's
STS calls (IRSA and GetCallerIdentity) go to FakeAwsSts via AWS_ENDPOINT_URL_STS;
``tests/aws/conftest.py`` fails any test that leaves loopback. The ECS
relative-URI environment needs 169.254.170.2 and runs in a network namespace
(``test_ecs_netns.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker import settings
from broker.clock import ManualClock
from broker.fakes import DEFAULT_SERVICE_ACCOUNT, FakeGoogle
from broker.fakes.oidc import FakeOidcIssuer
from tests.aws._harness import (
    IRSA_SESSION,
    aws_latency_observations,
    broker_settings,
    caller_identity_calls,
    credential_info,
    described_broker,
    provider_method,
    real_clients,
    signed_requests,
    token_response,
    upstream_aws_calls,
)
from tests.conftest import require_tool
from tests.fakes.aws import ISOLATED_ENV, FakeAws, FakeAwsAccount, accept_aws

POD_IDENTITY_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eks-pod-identity-token.fake"
ECS_AUTH_TOKEN = "ecs-agent-authorization-token-value"


@dataclass(frozen=True)
class Environment:
    name: str
    method: str  # botocore's provider name
    platform_env: Callable[[FakeAws, Path], dict[str, str]]
    region: str = "us-east-2"
    pod_identity_token: str | None = None


def _env_vars(aws: FakeAws, tmp: Path) -> dict[str, str]:
    creds = aws.account.current()
    assert creds.session_token is not None
    return {
        "AWS_ACCESS_KEY_ID": creds.access_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
        "AWS_SESSION_TOKEN": creds.session_token,
    }


def _ec2(aws: FakeAws, tmp: Path) -> dict[str, str]:
    return aws.imds_env()


def _ec2_region_from_imds(aws: FakeAws, tmp: Path) -> dict[str, str]:
    aws.imds.region, aws.imds.availability_zone = "eu-west-3", "eu-west-3c"
    return aws.imds_env()


def _ecs_full_uri(aws: FakeAws, tmp: Path) -> dict[str, str]:
    return {**aws.container_env(), "AWS_CONTAINER_AUTHORIZATION_TOKEN": ECS_AUTH_TOKEN}


def _pod_identity(aws: FakeAws, tmp: Path) -> dict[str, str]:
    token_file = tmp / "eks-pod-identity-token"
    token_file.write_text(POD_IDENTITY_TOKEN)
    return aws.container_env(str(token_file))


def _irsa(aws: FakeAws, tmp: Path) -> dict[str, str]:
    assert aws.sts.issuer is not None
    token_file = tmp / "eks-irsa-token"
    jwt = aws.sts.issuer.mint("sts.amazonaws.com", subject="system:serviceaccount:default:app")
    token_file.write_text(jwt)
    env = aws.web_identity_env(str(token_file))
    env["AWS_STS_REGIONAL_ENDPOINTS"] = "regional"  # what the EKS webhook injects
    return env


ENVIRONMENTS = [
    Environment("env-vars", "env", _env_vars),
    Environment("ec2-imdsv2", "iam-role", _ec2),
    Environment("ec2-region-from-imds", "iam-role", _ec2_region_from_imds, region="eu-west-3"),
    Environment("ecs-full-uri", "container-role", _ecs_full_uri, pod_identity_token=ECS_AUTH_TOKEN),
    Environment("eks-pod-identity", "container-role", _pod_identity, pod_identity_token=POD_IDENTITY_TOKEN),
    Environment("eks-irsa", "assume-role-with-web-identity", _irsa),
]


def _expected_subject(env: Environment, aws: FakeAws) -> Callable[[str], bool]:
    if env.method == "assume-role-with-web-identity":
        return lambda arn: bool(IRSA_SESSION.match(arn))
    return lambda arn: arn == aws.account.assumed_role_arn()


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=[e.name for e in ENVIRONMENTS])
async def test_environment_end_to_end(
    env: Environment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gcloud = require_tool("gcloud")
    issuer = FakeOidcIssuer() if env.method == "assume-role-with-web-identity" else None
    async with (
        FakeAws(pod_identity_token=env.pod_identity_token, issuer=issuer) as aws,
        FakeGoogle() as google,
    ):
        accept_aws(google.sts, aws.account)
        platform = env.platform_env(aws, tmp_path)
        for key, value in {**ISOLATED_ENV, **platform, "AWS_ENDPOINT_URL_STS": aws.sts_url}.items():
            monkeypatch.setenv(key, value)
        if env.name != "ec2-region-from-imds":
            monkeypatch.setenv("AWS_REGION", env.region)
        else:
            monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
        cred_file = tmp_path / "credentials.json"
        cred_file.write_text(json.dumps(credential_info(google, aws.imds_url)))
        aws_ok, aws_timed = upstream_aws_calls(), aws_latency_observations()

        async with described_broker(broker_settings(cred_file)) as (broker, _):
            clients = await real_clients(broker, tmp_path, gcloud)

        # Both real clients got tokens that IAM minted for them, via the broker.
        assert clients.gcloud.returncode == 0, clients.describe()
        assert clients.gcloud_token in google.iam.issued_access, clients.describe()
        assert clients.google_auth.returncode == 0, clients.describe()
        assert clients.google_auth_token in google.iam.issued_access, clients.describe()

        # Google STS verified a SigV4 signature made with keys the account issued, for this role.
        is_expected = _expected_subject(env, aws)
        subjects = [issued.subject for issued in google.sts.issued.values()]
        assert subjects, "no STS exchange"
        assert all(is_expected(s) for s in subjects), subjects
        for signed in signed_requests(google):
            assert signed.region == env.region
            assert (
                signed.url
                == f"https://sts.{env.region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
            )
            assert "x-goog-cloud-target-resource" in signed.signed_headers
            assert aws.account.lookup(signed.access_key_id) is not None
            if env.method == "env":
                assert signed.access_key_id == platform["AWS_ACCESS_KEY_ID"]

        # Which provider botocore used, and the upstream="aws" calls it took.
        assert provider_method() == env.method
        assert upstream_aws_calls() > aws_ok
        assert aws_latency_observations() > aws_timed

        # SPEC §8: run never asks AWS STS who it is (check does); the chain signs only.
        assert caller_identity_calls(aws) == []

        # Each platform endpoint was used as the platform serves it.
        if env.method == "container-role":
            assert aws.container.calls, "the container endpoint was never asked"
            for call in aws.container.calls:
                assert call.headers["authorization"] == env.pod_identity_token
        if env.method == "iam-role":
            assert [c.method for c in aws.imds.calls][:1] == ["PUT"], "IMDSv2 starts with a token PUT"
        else:
            assert not aws.imds.calls, "IMDS is the last resort; it must not be asked here"


async def test_rotated_aws_keys_are_used_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider hands out new keys (old ones revoked); the next exchange signs with them.

    Container credentials that expire within botocore's mandatory refresh window
    (10 minutes) are re-fetched for every exchange, so the broker, not a restart,
    picks the new keys up. The broker's clock is advanced past the token refresh
    point; the fakes keep real time, as AWS and Google would.
    """
    gcloud = require_tool("gcloud")
    account = FakeAwsAccount(lifetime_seconds=300)
    async with FakeAws(account) as aws, FakeGoogle() as google:
        accept_aws(google.sts, account)
        for key, value in {
            **aws.container_env(),
            "AWS_REGION": "us-east-2",
            "AWS_ENDPOINT_URL_STS": aws.sts_url,
        }.items():
            monkeypatch.setenv(key, value)
        cred_file = tmp_path / "credentials.json"
        cred_file.write_text(json.dumps(credential_info(google, aws.imds_url)))
        clock = ManualClock(time.time())
        async with described_broker(broker_settings(cred_file), clock=clock) as (broker, _):
            before = await real_clients(broker, tmp_path, gcloud)
            assert before.google_auth_token in google.iam.issued_access, before.describe()
            first_keys = {s.access_key_id for s in signed_requests(google)}
            assert first_keys == {account.current().access_key_id}

            old = account.current()
            new = account.rotate(revoke=True)
            exchanges = len(google.sts.issued)
            minted = len(google.iam.issued_access)
            await clock.advance(3600 - 600 + 1)  # past refresh-before (600 s) plus jitter
            for _ in range(200):
                if len(google.sts.issued) > exchanges and len(google.iam.issued_access) > minted:
                    break
                await clock.advance(0)
                await asyncio.sleep(0.05)
            calls = len(google.sts.calls)
            assert len(google.sts.issued) > exchanges, f"no new exchange accepted ({calls} STS calls)"

            latest = signed_requests(google)[-1]
            assert latest.access_key_id == new.access_key_id != old.access_key_id
            assert account.lookup(old.access_key_id) is None  # revoked: the old key would be refused

            after = await real_clients(broker, tmp_path, gcloud)
            assert after.gcloud_token in google.iam.issued_access, after.describe()
            assert after.google_auth_token in google.iam.issued_access, after.describe()
            assert after.google_auth_token != before.google_auth_token, "still serving the old token"
            status, _ = await token_response(broker)
            assert status == 200
        assert provider_method() == "container-role"


async def test_strict_mode_uses_env_and_the_files_imds_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--aws-credentials strict``: google-auth's behaviour (env, else IMDS at the file's URLs).

    No AWS_EC2_METADATA_SERVICE_ENDPOINT here: strict mode finds FakeImds only
    through the credential file, region included (its ``region_url``). The
    container endpoint in the environment is ignored, as google-auth ignores it.
    """
    async with FakeAws(pod_identity_token=ECS_AUTH_TOKEN) as aws, FakeGoogle() as google:
        accept_aws(google.sts, aws.account)
        for key, value in {
            **ISOLATED_ENV,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": aws.container_url,
            "AWS_ENDPOINT_URL_STS": aws.sts_url,
        }.items():
            monkeypatch.setenv(key, value)
        cred_file = tmp_path / "credentials.json"
        cred_file.write_text(json.dumps(credential_info(google, aws.imds_url)))
        async with described_broker(broker_settings(cred_file, aws_credentials="strict")) as (broker, _):
            status, body = await token_response(broker)
        assert status == 200, body
        assert json.loads(body)["access_token"] in google.iam.issued_access
        assert provider_method() == "iam-role"
        assert not aws.container.calls
        assert {s.region for s in signed_requests(google)} == {"us-east-2"}  # from region_url's zone

        # And with the file's IMDS unreachable, strict mode says what it tried (not the container).
        closed = "http://127.0.0.1:9/"
        cred_file.write_text(json.dumps(credential_info(google, closed)))
        monkeypatch.setenv("AWS_REGION", "us-east-2")
        async with described_broker(broker_settings(cred_file, aws_credentials="strict")) as (broker, _):
            status, body = await token_response(broker)
        assert status == 503, body
        assert "no AWS credentials found; tried env, EC2 instance metadata." in body
        assert "127.0.0.1:9 is unreachable" in body


async def test_fileless_source_aws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--audience … --source aws`` (no credential file) takes the same botocore chain."""
    async with FakeAws() as aws, FakeGoogle() as google:
        accept_aws(google.sts, aws.account)
        platform = {**aws.imds_env(), "AWS_REGION": "us-east-2", "AWS_ENDPOINT_URL_STS": aws.sts_url}
        for key, value in platform.items():
            monkeypatch.setenv(key, value)
        resolved = settings.build(
            {
                "audience": google.audience,
                "service_account": DEFAULT_SERVICE_ACCOUNT,
                "source": "aws",
                "token_url": google.token_url,
                "iam_endpoint": google.iam_base_url,
                "listen": ["127.0.0.1:0"],
                "admin_listen": "127.0.0.1:0",
            },
            environ={},
        )
        async with described_broker(resolved) as (broker, _):
            status, body = await token_response(broker)
        assert status == 200, body
        assert json.loads(body)["access_token"] in google.iam.issued_access
        assert provider_method() == "iam-role"
        assert [t.subject for t in google.sts.issued.values()] == [aws.account.assumed_role_arn()]

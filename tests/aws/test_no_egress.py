"""No egress the chain does not need (SPEC §8): ``run`` never calls AWS STS itself.

The broker signs a GetCallerIdentity request for Google STS to replay (the
subject token), but sending one to AWS STS to learn its own principal is an
outbound call the chain never needs, and it hangs in a private subnet without an
STS endpoint. That description belongs to ``check``. FakeAwsSts sees every
request botocore's own STS client makes; the signed request Google STS verifies
never reaches it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from broker.fakes import FakeGoogle
from tests.aws._harness import (
    broker_settings,
    caller_identity_calls,
    credential_info,
    described_broker,
    signed_requests,
    token_response,
)
from tests.fakes.aws import ISOLATED_ENV, FakeAws, accept_aws
from tests.resilience._support import until_ready


async def test_run_sends_no_get_caller_identity_to_aws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeAws() as aws, FakeGoogle() as google:
        accept_aws(google.sts, aws.account)
        platform = {**aws.imds_env(), "AWS_REGION": "us-east-2", "AWS_ENDPOINT_URL_STS": aws.sts_url}
        for key, value in {**ISOLATED_ENV, **platform}.items():
            monkeypatch.setenv(key, value)
        cred_file = tmp_path / "credentials.json"
        cred_file.write_text(json.dumps(credential_info(google, aws.imds_url)))
        async with described_broker(broker_settings(cred_file)) as (broker, _):
            await until_ready(broker)
            status, body = await token_response(broker)
            assert status == 200, body
            # Start-up is over (ready, and a client served); give a stray describe time to show.
            await asyncio.sleep(1.0)
        assert signed_requests(google), "the chain never exchanged an AWS subject token"
        assert caller_identity_calls(aws) == []
        assert aws.sts.calls == []  # IMDS credentials: nothing at all for AWS STS

"""Offline stand-ins for the AWS credential sources the broker signs with, under one import.

``FakeAws`` serves FakeImds, FakeEcsCredentials and FakeAwsSts for one
FakeAwsAccount on loopback ports, and hands out the environment that points
botocore at each of them. Pass the same account to :func:`accept_aws` for the fake Google STS so
Google's side can verify what was signed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from broker.fakes._service import LoopbackServices, Service
from broker.fakes.oidc import FakeOidcIssuer
from broker.fakes.sts import FakeSts, StsRejected
from tests.fakes.aws_account import AwsCredentials, FakeAwsAccount, iso8601
from tests.fakes.aws_metadata import FakeEcsCredentials, FakeImds
from tests.fakes.aws_sigv4 import (
    AWS4_REQUEST_TYPE,
    AwsSubjectRejected,
    SignedRequest,
    parse_aws_subject_token,
    sigv4_signature,
    verify_aws_subject_token,
)
from tests.fakes.aws_sts import FakeAwsSts

__all__ = [
    "AWS4_REQUEST_TYPE",
    "ISOLATED_ENV",
    "AwsCredentials",
    "AwsSubjectRejected",
    "FakeAws",
    "FakeAwsAccount",
    "FakeAwsSts",
    "FakeEcsCredentials",
    "FakeImds",
    "SignedRequest",
    "accept_aws",
    "iso8601",
    "parse_aws_subject_token",
    "sigv4_signature",
    "verify_aws_subject_token",
]

# Keeps the host's ~/.aws out of botocore; clear the other AWS_* variables as well.
ISOLATED_ENV = {"AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


class FakeAws(LoopbackServices):
    """Account + IMDS + container endpoint + STS on 127.0.0.1 ephemeral ports.

    Use as ``async with FakeAws() as aws:``. ``pod_identity_token`` makes the
    container endpoint demand that raw ``Authorization`` value (EKS Pod Identity).
    """

    def __init__(
        self,
        account: FakeAwsAccount | None = None,
        *,
        pod_identity_token: str | None = None,
        issuer: FakeOidcIssuer | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.account = account if account is not None else FakeAwsAccount(now=now)
        self.imds = FakeImds(self.account, now=now)
        self.container = FakeEcsCredentials(self.account, authorization=pod_identity_token, now=now)
        self.sts = FakeAwsSts(self.account, issuer=issuer, now=now)
        super().__init__()

    def _services(self) -> list[Service]:
        return [
            ("imds", self.imds.app(), None),
            ("container", self.container.app(), None),
            ("sts", self.sts.app(), None),
        ]

    @property
    def imds_url(self) -> str:
        """``http://127.0.0.1:PORT/``, for ``AWS_EC2_METADATA_SERVICE_ENDPOINT``."""
        return self._base("imds") + "/"

    @property
    def container_url(self) -> str:
        """The full credential URI, for ``AWS_CONTAINER_CREDENTIALS_FULL_URI``."""
        return self._base("container") + self.container.path

    @property
    def sts_url(self) -> str:
        """``http://127.0.0.1:PORT``, for ``AWS_ENDPOINT_URL_STS``."""
        return self._base("sts")

    def imds_env(self) -> dict[str, str]:
        return {**ISOLATED_ENV, "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds_url}

    def container_env(self, authorization_token_file: str | None = None) -> dict[str, str]:
        env = {**ISOLATED_ENV, "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.container_url}
        if authorization_token_file is not None:
            env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] = authorization_token_file
        return env

    def web_identity_env(self, web_identity_token_file: str, region: str = "us-east-2") -> dict[str, str]:
        return {
            **ISOLATED_ENV,
            "AWS_ROLE_ARN": self.account.role_arn,
            "AWS_WEB_IDENTITY_TOKEN_FILE": web_identity_token_file,
            "AWS_ENDPOINT_URL_STS": self.sts_url,
            "AWS_DEFAULT_REGION": region,
        }


def accept_aws(sts: FakeSts, account: FakeAwsAccount | None) -> None:
    """Make ``sts`` an AWS provider too: accept ``aws4_request`` subject tokens whose
    SigV4 signature verifies against the keys ``account`` issued (None: refuse them).

    The subject is the caller's ARN, as Google STS maps ``assertion.arn``.
    """
    if account is None:
        sts.accept_subject_type(AWS4_REQUEST_TYPE, None)
        return

    def claims(token: str) -> dict[str, Any]:
        try:
            creds = verify_aws_subject_token(
                token,
                audiences=(sts.audience, "https:" + sts.audience),
                lookup=account.lookup,
                now=sts.now(),
            )
        except AwsSubjectRejected as exc:
            raise StsRejected(exc.error, exc.description) from None
        return {"sub": creds.arn, "access_key_id": creds.access_key_id}

    sts.accept_subject_type(AWS4_REQUEST_TYPE, claims)

"""Offline stand-ins for Google's token chain: an OIDC issuer, STS and IAM Credentials.

``FakeGoogle`` serves FakeSts and FakeIam on two loopback ports, the way the real
services live on two hosts, so a broker that posts to the wrong endpoint fails
here as it would in production. It backs ``wif-broker demo`` and the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from broker.fakes._service import LoopbackServices, Service
from broker.fakes.google import FakeIam, FakeSts, IssuedToken, Recorded
from broker.fakes.oidc import DEFAULT_SUBJECT, FakeGoogleSigner, FakeOidcIssuer

__all__ = [
    "DEFAULT_AUDIENCE",
    "DEFAULT_SERVICE_ACCOUNT",
    "FakeGoogle",
    "FakeGoogleSigner",
    "FakeIam",
    "FakeOidcIssuer",
    "FakeSts",
    "IssuedToken",
    "Recorded",
]

DEFAULT_AUDIENCE = (
    "//iam.googleapis.com/projects/123456789012/locations/global"
    "/workloadIdentityPools/wif-broker-demo/providers/fake-oidc"
)
DEFAULT_SERVICE_ACCOUNT = "app@wif-broker-demo.iam.gserviceaccount.com"


class FakeGoogle(LoopbackServices):
    """Issuer + FakeSts + FakeIam running on 127.0.0.1 ephemeral ports.

    Use as ``async with FakeGoogle(...) as google:`` or call :meth:`start` and
    :meth:`close` yourself. URLs are available once started.
    """

    def __init__(
        self,
        audience: str = DEFAULT_AUDIENCE,
        service_accounts: Iterable[str] = (DEFAULT_SERVICE_ACCOUNT,),
        lifetime_seconds: int = 3600,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self._now = now
        self.issuer = FakeOidcIssuer()
        self.sts = FakeSts(self.issuer, audience, lifetime_seconds=lifetime_seconds, now=now)
        self.iam = FakeIam(self.sts, set(service_accounts), lifetime_seconds=lifetime_seconds, now=now)
        super().__init__()

    def _services(self) -> list[Service]:
        return [("sts", self.sts.app(), None), ("iam", self.iam.app(), None)]

    @property
    def token_url(self) -> str:
        """The STS token endpoint, for ``token_url`` in an external_account config."""
        return f"{self._base('sts')}/v1/token"

    @property
    def iam_base_url(self) -> str:
        return self._base("iam")

    def impersonation_url(self, email: str = DEFAULT_SERVICE_ACCOUNT) -> str:
        """The ``service_account_impersonation_url`` for ``email``."""
        return f"{self.iam_base_url}/v1/projects/-/serviceAccounts/{email}:generateAccessToken"

    def credential_info(self, token_file: str, *, impersonate: bool = True) -> dict[str, Any]:
        """An ``external_account`` config, as gcloud writes it, pointing at these fakes."""
        info: dict[str, Any] = {
            "type": "external_account",
            "audience": self.audience,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": self.token_url,
            "credential_source": {"file": token_file, "format": {"type": "text"}},
        }
        if impersonate:
            info["service_account_impersonation_url"] = self.impersonation_url()
        return info

    def subject_token(self, subject: str = DEFAULT_SUBJECT, lifetime_seconds: int = 3600) -> str:
        """A subject token STS will accept, minted at the fakes' own ``now``."""
        return self.issuer.mint(self.audience, subject, lifetime_seconds, now=self._now())

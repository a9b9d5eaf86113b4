"""A fake AWS account: the registry of temporary credentials the AWS fakes hand out.

FakeImds, FakeEcsCredentials and FakeAwsSts issue credentials from here, and
FakeSts looks the access key id up here to recompute a subject token's SigV4
signature, so a token signed with keys the account never issued (or with the
wrong secret) is rejected the way Google rejects it after replaying it to AWS.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ACCOUNT_ID = "123456789012"
DEFAULT_ROLE = "wif-broker-role"
DEFAULT_SESSION = "i-0123456789abcdef0"  # what EC2 names an instance profile's session
INSTANCE_LIFETIME = 6 * 3600  # IMDS and container credentials last about six hours
_KEY_ALPHABET = string.ascii_uppercase + string.digits


def iso8601(epoch: float) -> str:
    """``2020-08-11T06:55:22Z``: the timestamp shape every AWS credential endpoint uses."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass(frozen=True)
class AwsCredentials:
    """One set of temporary credentials and the principal they belong to."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(repr=False)
    issued_at: float
    expires_at: float
    arn: str  # the caller identity: arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION
    role_arn: str  # arn:aws:iam::ACCOUNT:role/ROLE

    @property
    def expiration(self) -> str:
        return iso8601(self.expires_at)

    @property
    def last_updated(self) -> str:
        return iso8601(self.issued_at)

    def imds_document(self) -> dict[str, Any]:
        """The body of ``GET /latest/meta-data/iam/security-credentials/<role>``."""
        return {
            "Code": "Success",
            "LastUpdated": self.last_updated,
            "Type": "AWS-HMAC",
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.session_token,
            "Expiration": self.expiration,
        }

    def container_document(self) -> dict[str, Any]:
        """The body the ECS / EKS Pod Identity credential endpoint serves."""
        return {
            "RoleArn": self.role_arn,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.session_token,
            "Expiration": self.expiration,
        }


class FakeAwsAccount:
    """One account with one role; remembers every credential it issued.

    ``current()`` is the instance-profile / task-role credential that the
    metadata fakes serve: stable across calls until it expires or ``rotate()``
    replaces it. Keys issued earlier stay valid until they expire, as on AWS,
    unless ``rotate(revoke=True)`` or ``revoke()`` forgets them.
    """

    def __init__(
        self,
        account_id: str = DEFAULT_ACCOUNT_ID,
        role_name: str = DEFAULT_ROLE,
        session_name: str = DEFAULT_SESSION,
        *,
        lifetime_seconds: int = INSTANCE_LIFETIME,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.account_id = account_id
        self.role_name = role_name
        self.session_name = session_name
        self.lifetime_seconds = lifetime_seconds
        self.now = now
        self.credentials: dict[str, AwsCredentials] = {}
        self._current: AwsCredentials | None = None

    @property
    def role_arn(self) -> str:
        return f"arn:aws:iam::{self.account_id}:role/{self.role_name}"

    @property
    def role_id(self) -> str:
        """A stable ``AROA…`` unique id for the role, like IAM's RoleId."""
        digest = hashlib.sha256(self.role_arn.encode("utf-8")).digest()
        return "AROA" + base64.b32encode(digest).decode("ascii")[:17]

    def assumed_role_arn(self, session_name: str | None = None) -> str:
        session = self.session_name if session_name is None else session_name
        return f"arn:aws:sts::{self.account_id}:assumed-role/{self.role_name}/{session}"

    def issue(self, session_name: str | None = None, lifetime_seconds: int | None = None) -> AwsCredentials:
        """New ``ASIA…`` keys for the role, registered so signatures made with them verify."""
        now = self.now()
        lifetime = self.lifetime_seconds if lifetime_seconds is None else lifetime_seconds
        creds = AwsCredentials(
            access_key_id="ASIA" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16)),
            # Standard base64 so secrets and tokens carry '+' and '/' like real ones.
            secret_access_key=base64.b64encode(secrets.token_bytes(30)).decode("ascii"),
            session_token="IQoJb3JpZ2luX2VjEFake"
            + base64.b64encode(secrets.token_bytes(240)).decode("ascii"),
            issued_at=now,
            expires_at=now + lifetime,
            arn=self.assumed_role_arn(session_name),
            role_arn=self.role_arn,
        )
        return self.register(creds)

    def register(self, creds: AwsCredentials) -> AwsCredentials:
        """Trust externally made credentials too (e.g. published SigV4 test vectors)."""
        self.credentials[creds.access_key_id] = creds
        return creds

    def current(self) -> AwsCredentials:
        """The role's live instance/container credentials, reissued once expired."""
        if self._current is None or self._current.expires_at <= self.now():
            self._current = self.issue()
        return self._current

    def rotate(self, *, revoke: bool = False) -> AwsCredentials:
        """Replace the current credentials with new keys; optionally invalidate the old ones."""
        old = self._current
        self._current = self.issue()
        if revoke and old is not None:
            self.revoke(old.access_key_id)
        return self._current

    def revoke(self, access_key_id: str) -> None:
        self.credentials.pop(access_key_id, None)

    def lookup(self, access_key_id: str) -> AwsCredentials | None:
        """The credentials with this key id, expired or not (the caller judges expiry)."""
        return self.credentials.get(access_key_id)

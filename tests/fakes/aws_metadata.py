"""Fakes of the AWS credential endpoints inside compute: EC2 IMDS and the container endpoint.

Both serve the account's *current* credentials, so ``account.rotate()`` is what
a test calls to make the platform hand out new keys. Wire formats follow
token-chain.md D.6 and are checked against real botocore in the tests.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable

from aiohttp import web

from broker.fakes._service import FakeService
from tests.fakes.aws_account import FakeAwsAccount

TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL = 21600
_CREDENTIALS = "/latest/meta-data/iam/security-credentials"


def _text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/plain")


class _AccountBacked(FakeService):
    """A FakeService whose ``lifetime_seconds`` is the account's credential lifetime."""

    def __init__(self, account: FakeAwsAccount, now: Callable[[], float]) -> None:
        self.account = account
        super().__init__(lifetime_seconds=account.lifetime_seconds, now=now)

    @property
    def lifetime_seconds(self) -> int:
        return self.account.lifetime_seconds

    @lifetime_seconds.setter
    def lifetime_seconds(self, value: int) -> None:
        self.account.lifetime_seconds = value


class FakeImds(_AccountBacked):
    """EC2 instance metadata (IMDSv2) with an instance profile for the account's role.

    Knobs: ``region``, ``availability_zone`` (Local Zone names such as
    ``us-west-2-lax-1a`` are fine), ``v1_enabled`` (serve GETs without a session
    token, as instances with ``HttpTokens=optional`` do) and ``role_attached``
    (``False``: no instance profile, the role listing is a 404).
    """

    def __init__(
        self,
        account: FakeAwsAccount,
        *,
        region: str = "us-east-2",
        availability_zone: str = "us-east-2b",
        v1_enabled: bool = False,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(account, now)
        self.region = region
        self.availability_zone = availability_zone
        self.v1_enabled = v1_enabled
        self.role_attached = True
        self.tokens: dict[str, float] = {}  # session token -> expiry

    def _add_routes(self, application: web.Application) -> None:
        router = application.router
        router.add_put("/latest/api/token", self._token)
        for path in (_CREDENTIALS, _CREDENTIALS + "/"):
            router.add_get(path, self._role_listing)
        router.add_get(_CREDENTIALS + "/{role}", self._role_credentials)
        for name, handler in (("region", self._region), ("availability-zone", self._zone)):
            router.add_get(f"/latest/meta-data/placement/{name}", handler)
            router.add_get(f"/latest/meta-data/placement/{name}/", handler)

    async def _token(self, request: web.Request) -> web.Response:
        if "X-Forwarded-For" in request.headers:
            # IMDS refuses token requests that went through a proxy.
            return _text("Forbidden", 403)
        raw = request.headers.get(TOKEN_TTL_HEADER)
        if raw is None or not raw.strip().isdigit() or not 1 <= int(raw) <= MAX_TOKEN_TTL:
            return _text("Bad Request", 400)
        ttl = int(raw)
        token = "AQAEAFake" + secrets.token_urlsafe(40) + "=="
        self.tokens[token] = self.now() + ttl
        return web.Response(text=token, content_type="text/plain", headers={TOKEN_TTL_HEADER: str(ttl)})

    def _denied(self, request: web.Request) -> web.Response | None:
        token = request.headers.get(TOKEN_HEADER)
        if token is None:
            return None if self.v1_enabled else _text("Unauthorized", 401)
        expiry = self.tokens.get(token)
        if expiry is None or expiry <= self.now():
            return _text("Unauthorized", 401)
        return None

    async def _role_listing(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        if not self.role_attached:
            return _text("Not Found", 404)
        return _text(self.account.role_name)

    async def _role_credentials(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied is not None:
            return denied
        if not self.role_attached or request.match_info["role"] != self.account.role_name:
            return _text("Not Found", 404)
        return _text(json.dumps(self.account.current().imds_document(), indent=2))

    async def _region(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        return _text(self.region) if denied is None else denied

    async def _zone(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        return _text(self.availability_zone) if denied is None else denied


class FakeEcsCredentials(_AccountBacked):
    """The ECS task-role / EKS Pod Identity credential endpoint: ``GET <path>``.

    With ``authorization`` set (Pod Identity), the request's ``Authorization``
    header must equal it exactly: the raw token file contents, no ``Bearer``.
    """

    def __init__(
        self,
        account: FakeAwsAccount,
        *,
        path: str = "/v1/credentials",
        authorization: str | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(account, now)
        self.path = path
        self.authorization = authorization

    def _add_routes(self, application: web.Application) -> None:
        application.router.add_get(self.path, self._credentials)

    async def _credentials(self, request: web.Request) -> web.Response:
        if self.authorization is not None:
            given = request.headers.get("Authorization")
            if given is None or not secrets.compare_digest(given.encode(), self.authorization.encode()):
                message = "missing" if given is None else "invalid"
                return web.json_response(
                    {"Code": "AccessDeniedException", "Message": f"Authorization header is {message}"},
                    status=401,
                )
        return web.json_response(self.account.current().container_document())

"""Offline stand-ins for Azure identity: IMDS managed identity and Entra ID workload identity.

``FakeAzure`` serves ``FakeAzureImds`` over plain HTTP (what
``AZURE_POD_IDENTITY_AUTHORITY_HOST`` points azure-identity at, or a credential
file's ``credential_source.url``) and ``FakeEntraId`` over TLS with a throwaway CA
(azure-identity accepts only an https ``AZURE_AUTHORITY_HOST``), both minting from
one ``FakeEntraTenant``. ``aks`` is the cluster's OIDC issuer: it signs the
projected tokens (workload identity's federated token, or a token Google takes
directly). To make Google's side accept the Entra tokens, point ``FakeSts`` at the
tenant's issuer and the app's audience (``FakeAzure.google_provider``).
"""

from __future__ import annotations

import ssl
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web

from broker.fakes._service import FakeService, LoopbackServices, Service
from broker.fakes.oidc import FakeOidcIssuer
from broker.fakes.sts import FakeSts
from tests.fakes.azure_entra import (
    AKS_ISSUER,
    DEFAULT_APP,
    FEDERATED_AUDIENCE,
    SYSTEM_ASSIGNED,
    TENANT_ID,
    USER_ASSIGNED,
    EntraApp,
    FakeEntraId,
    FakeEntraTenant,
    FederatedCredential,
    ManagedIdentity,
    oauth_error,
)
from tests.fakes.tls import make_test_ca

__all__ = [
    "AKS_ISSUER",
    "DEFAULT_APP",
    "FEDERATED_AUDIENCE",
    "SYSTEM_ASSIGNED",
    "TENANT_ID",
    "USER_ASSIGNED",
    "EntraApp",
    "FakeAzure",
    "FakeAzureImds",
    "FakeEntraId",
    "FakeEntraTenant",
    "FederatedCredential",
    "ManagedIdentity",
]

IMDS_TOKEN_PATH = "/metadata/identity/oauth2/token"


class FakeAzureImds(FakeService):
    """``GET /metadata/identity/oauth2/token`` of Azure IMDS for one VM's identities."""

    def __init__(
        self,
        tenant: FakeEntraTenant,
        *,
        system_assigned: ManagedIdentity | None = SYSTEM_ASSIGNED,
        user_assigned: Iterable[ManagedIdentity] = (USER_ASSIGNED,),
        lifetime_seconds: int = 86399,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(lifetime_seconds=lifetime_seconds, now=now)
        self.tenant = tenant
        self.system_assigned = system_assigned
        self.user_assigned = {identity.client_id: identity for identity in user_assigned}
        self.queries: list[dict[str, str]] = []  # query of each token request that reached the handler

    def _add_routes(self, application: web.Application) -> None:
        application.router.add_get("/metadata/identity/oauth2/token", self._token)

    async def _token(self, request: web.Request) -> web.Response:
        self.queries.append(dict(request.query))
        if request.headers.get("Metadata") != "true":
            return oauth_error(400, "bad_request_102", None, "Required metadata header not specified")
        query = request.query
        if not query.get("api-version"):
            return oauth_error(
                400, "invalid_request", None, "Required query variable 'api-version' is missing"
            )
        resource = query.get("resource", "")
        if not resource:
            return oauth_error(400, "invalid_request", None, "Required query variable 'resource' is missing")
        selector = query.get("client_id") or query.get("object_id") or query.get("msi_res_id")
        if selector:
            identity = self.user_assigned.get(selector) or next(
                (i for i in self.user_assigned.values() if i.object_id == selector), None
            )
        else:
            identity = self.system_assigned
        if identity is None:
            return oauth_error(400, "invalid_request", None, "Identity not found")
        app = self.tenant.app(resource)
        if app is None:
            return oauth_error(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{self.tenant.tenant_id}. This can happen if the application has not been installed "
                "by the administrator of the tenant.",
            )
        now = int(self.now())
        token = self.tenant.mint(identity, app, resource, now, self.lifetime_seconds)
        # Every number is a string, as the real IMDS sends them.
        return web.json_response(
            {
                "access_token": token,
                "client_id": identity.client_id,
                "expires_in": str(self.lifetime_seconds),
                "expires_on": str(now + self.lifetime_seconds),
                "ext_expires_in": str(self.lifetime_seconds),
                "not_before": str(now),
                "resource": resource,
                "token_type": "Bearer",
            }
        )


class FakeAzure(LoopbackServices):
    """Tenant + IMDS (http) + Entra ID (https, test CA) + an AKS OIDC issuer, on 127.0.0.1.

    Use as ``async with FakeAzure() as azure:``; the CA and keys live in a
    temporary directory removed on close.
    """

    def __init__(
        self,
        tenant: FakeEntraTenant | None = None,
        *,
        aks_issuer: FakeOidcIssuer | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.tenant = tenant if tenant is not None else FakeEntraTenant()
        self.aks = aks_issuer if aks_issuer is not None else FakeOidcIssuer(AKS_ISSUER, kid="fake-aks-1")
        self.tenant.trust(self.aks)
        self._now = now
        self.imds = FakeAzureImds(self.tenant, now=now)
        self.entra = FakeEntraId(self.tenant, now=now)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._ca_file: Path | None = None
        self._entra_tls: ssl.SSLContext | None = None
        super().__init__()

    async def _before_start(self) -> None:
        # Entra is https-only for azure-identity: a CA made per run, removed on close.
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-azure-")
        ca = make_test_ca(Path(self._tmp.name))
        self._ca_file, self._entra_tls = ca.ca_file, ca.server_context

    def _services(self) -> list[Service]:
        return [("imds", self.imds.app(), None), ("entra", self.entra.app(), self._entra_tls)]

    async def _after_close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = self._ca_file = self._entra_tls = None

    @property
    def imds_base(self) -> str:
        """``http://127.0.0.1:PORT``, for ``AZURE_POD_IDENTITY_AUTHORITY_HOST``."""
        return self._base("imds")

    @property
    def authority_host(self) -> str:
        """``https://127.0.0.1:PORT``, for ``AZURE_AUTHORITY_HOST``."""
        return self._base("entra")

    @property
    def ca_file(self) -> Path:
        """The test CA (PEM) that signed Entra ID's certificate, for ``SSL_CERT_FILE``."""
        self._base("entra")
        assert self._ca_file is not None
        return self._ca_file

    def imds_token_url(self, resource: str = DEFAULT_APP.app_id_uri, **params: str) -> str:
        """The IMDS URL as ``gcloud … create-cred-config --azure`` writes it (resource unencoded)."""
        extra = f"&{urlencode(params)}" if params else ""
        return f"{self.imds_base}{IMDS_TOKEN_PATH}?api-version=2018-02-01&resource={resource}{extra}"

    def managed_identity_env(self, client_id: str | None = None) -> dict[str, str]:
        env = {"AZURE_POD_IDENTITY_AUTHORITY_HOST": self.imds_base}
        if client_id:
            env["AZURE_CLIENT_ID"] = client_id
        return env

    def projected_token(self, audience: str, subject: str = "system:serviceaccount:default:app") -> str:
        """A projected service-account token from the AKS issuer (valid one hour)."""
        return self.aks.mint(audience, subject, 3600, now=self._now())

    def workload_identity_env(
        self,
        token_file: Path,
        identity: ManagedIdentity = USER_ASSIGNED,
        subject: str = "system:serviceaccount:default:app",
    ) -> dict[str, str]:
        """What the AKS webhook injects (plus the test CA); writes the federated token file."""
        token_file.write_text(self.projected_token(FEDERATED_AUDIENCE, subject))
        return {
            "AZURE_CLIENT_ID": identity.client_id,
            "AZURE_TENANT_ID": self.tenant.tenant_id,
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
            "AZURE_AUTHORITY_HOST": self.authority_host,
            "SSL_CERT_FILE": str(self.ca_file),
        }

    def google_provider(self, sts: FakeSts, app: EntraApp = DEFAULT_APP, resource: str = "") -> None:
        """Configure FakeSts as a provider for this tenant's tokens for ``app`` (issuer + audience).

        v2 tokens: issuer ``…/v2.0``, audience the app's client ID; v1 tokens: issuer
        ``https://sts.windows.net/TENANT/``, audience the resource as requested.
        """
        sts.issuer = self.tenant.issuer_of(app)
        audience = app.client_id if app.token_version == 2 else (resource or app.app_id_uri)
        sts.allowed_audiences = [audience]

    def aks_provider(self, sts: FakeSts, audiences: Iterable[str]) -> None:
        """Configure FakeSts as a provider on the AKS OIDC issuer (projected tokens taken directly)."""
        sts.issuer = self.aks
        sts.allowed_audiences = list(audiences)

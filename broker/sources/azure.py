"""Azure subject token from azure-identity: AKS workload identity, else a managed identity.

The token is an Entra ID access token for ``resource`` (an application ID URI
or client ID), requested as ``<resource>/.default`` (token-chain.md §E.4):

* ``WorkloadIdentityCredential`` when the AKS webhook's AZURE_FEDERATED_TOKEN_FILE,
  AZURE_CLIENT_ID and AZURE_TENANT_ID are all set: the projected token is
  exchanged at Entra ID (AZURE_AUTHORITY_HOST) for the identity's token;
* ``ManagedIdentityCredential`` otherwise (IMDS on VMs/VMSS, or whatever azure-identity
  detects: App Service, Arc, ...), with AZURE_CLIENT_ID selecting a user-assigned one.

azure-identity caches the Entra token and renews it 5 minutes before it
expires, so exchanges in between reuse it; STS only checks it at exchange time.

The credential's pipeline sends through the broker's own aiohttp session
(``session_owner=False``): no HTTP(S)_PROXY (IMDS must never be proxied), no
session of its own to leak, so :meth:`close` is tidy-up, not a requirement.
SSL_CERT_FILE, if set, is the CA bundle for Entra ID, as it is for the rest of
the broker's TLS (aiohttp reads it only at start-up; this reads it explicitly).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import ManagedIdentityCredential, WorkloadIdentityCredential

from broker.credconfig import AzureSource
from broker.errors import ConfigError
from broker.sources import azure_errors
from broker.sources.extract import describe_jwt
from broker.tokens import unverified_claims

WORKLOAD_VARS = ("AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID")
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
IMDS_HOST = "169.254.169.254"
# One immediate retry inside azure-identity (its own policy would back off for up to
# ~25 s, or 75 s on IMDS 410, while a client waits); the broker's cache retries the
# rest with capped backoff and keeps serving the previous token meanwhile.
TIMEOUT_SECONDS = 30.0
PIPELINE: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 15}
RETRY: dict[str, Any] = {"retry_total": 1}


def scope_of(resource: str) -> str:
    """``<resource>/.default``; azure-identity strips the suffix again for managed identity."""
    return resource if resource.endswith("/.default") else resource + "/.default"


def _host(url: str) -> str:
    return urlsplit(url if "//" in url else "https://" + url).netloc or url


def _quiet_azure_logs() -> None:
    """azure-core logs each request at INFO and azure-identity a WARNING per failure that the
    broker reports itself, classified and with the fix; ``log-level = debug`` keeps them all."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    for name, level in (("azure", logging.WARNING), ("azure.identity", logging.ERROR)):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


class AzureTokenSource:
    kind = "azure"

    def __init__(
        self,
        source: AzureSource,
        session: aiohttp.ClientSession,
        environ: Mapping[str, str],
        audience: str = "",
    ) -> None:
        self._source = source
        self._scope = scope_of(source.resource)
        self._audience = audience
        _quiet_azure_logs()
        env = dict(environ)
        ca_file = env.get("SSL_CERT_FILE", "")
        transport = AioHttpTransport(
            session=session,
            session_owner=False,
            connection_verify=ca_file if ca_file and Path(ca_file).is_file() else True,
            **PIPELINE,
        )
        self._credential: WorkloadIdentityCredential | ManagedIdentityCredential
        self._info: dict[str, str]
        if all(env.get(key) for key in WORKLOAD_VARS):
            authority = env.get("AZURE_AUTHORITY_HOST") or DEFAULT_AUTHORITY
            try:
                self._credential = WorkloadIdentityCredential(
                    tenant_id=env["AZURE_TENANT_ID"],
                    client_id=env["AZURE_CLIENT_ID"],
                    token_file_path=env["AZURE_FEDERATED_TOKEN_FILE"],
                    authority=authority,
                    transport=transport,
                    **RETRY,
                )
            except ValueError as exc:
                raise ConfigError("AZURE_AUTHORITY_HOST", str(exc)) from None
            self._info = {
                "credential": "workload_identity",
                "tenant_id": env["AZURE_TENANT_ID"],
                "client_id": env["AZURE_CLIENT_ID"],
                "token_file": env["AZURE_FEDERATED_TOKEN_FILE"],
            }
            self._host = _host(authority)
        else:
            client_id = env.get("AZURE_CLIENT_ID") or None
            self._credential = ManagedIdentityCredential(client_id=client_id, transport=transport, **RETRY)
            self._info = {"credential": "managed_identity", "client_id": client_id or "system-assigned"}
            self._host = _host(env.get("AZURE_POD_IDENTITY_AUTHORITY_HOST") or IMDS_HOST)
        self._closed = False

    async def subject_token(self) -> str:
        # Timed and counted once, as the subject-token step (broker/steps.py), upstream="azure".
        try:
            async with asyncio.timeout(TIMEOUT_SECONDS):
                token = await self._credential.get_token(self._scope)
            return str(token.token)
        except Exception as exc:
            raise azure_errors.classify(exc, self._context()) from None

    async def describe(self) -> dict[str, str]:
        """The identity, the token's iss/aud (v1 or v2), and the provider settings that accept it."""
        token = await self.subject_token()
        seen = {**self._info, "resource": self._source.resource, **describe_jwt(token)}
        try:
            claims = unverified_claims(token)
        except ValueError:
            return seen
        for claim in ("tid", "oid", "azp", "appid"):
            if claims.get(claim):
                seen[claim] = str(claims[claim])
        iss, aud = seen.get("iss", ""), seen.get("aud", "")
        version = str(claims.get("ver") or ("2.0" if iss.endswith("/v2.0") else "1.0"))
        seen["token_version"] = version
        # Google's provider: issuer URI and allowed audience must match the token as issued.
        # v1 iss is https://sts.windows.net/TENANT/ (Google documents it without the slash);
        # v2 iss is https://login.microsoftonline.com/TENANT/v2.0 and aud the app's client ID.
        seen["provider_issuer_uri"] = iss.rstrip("/") if version.startswith("1") else iss
        seen["provider_allowed_audience"] = aud
        pool = self._audience.removeprefix("//iam.googleapis.com/").split("/providers/")[0]
        if pool and seen.get("sub"):
            # With the usual mapping google.subject=assertion.sub.
            seen["bind"] = f"principal://iam.googleapis.com/{pool}/subject/{seen['sub']}"
        return seen

    async def close(self) -> None:
        """Close the credential's pipeline; the shared session stays with its owner."""
        if not self._closed:
            self._closed = True
            await self._credential.close()

    def _context(self) -> azure_errors.Context:
        iss = sub = ""
        token_file = self._info.get("token_file")
        if token_file:
            iss, sub = _assertion_claims(token_file)
        return azure_errors.Context(
            credential=self._info["credential"],
            host=self._host,
            resource=self._source.resource,
            client_id=self._info.get("client_id", ""),
            tenant_id=self._info.get("tenant_id", ""),
            assertion_iss=iss,
            assertion_sub=sub,
        )


def _assertion_claims(path: str) -> tuple[str, str]:
    """iss and sub of the federated token file (for a fix text; never the token itself)."""
    try:
        claims = unverified_claims(Path(path).read_text(encoding="utf-8").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return "", ""
    return str(claims.get("iss", "")), str(claims.get("sub", ""))

"""azure-identity's exceptions, classified: Transient (retry) or Denied (fix first), with the fix.

azure-identity raises ``CredentialUnavailableError`` (IMDS did not answer, or
answered 400: no such identity), ``ClientAuthenticationError`` with Entra's
answer attached (``AADSTS…`` codes), or azure-core's transport errors. The
HTTP answer, when there is one, is decoded like any other upstream error
(``httpclient.upstream_error``) so IMDS and Entra bodies read the same as the
url source's. Entra's ``AADSTS`` number then picks the fix.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
from azure.core.exceptions import ServiceRequestError, ServiceResponseError

from broker import httpclient
from broker.errors import BrokerError, Denied, Step, Transient

FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
# IMDS answers 404/410 while it is updating (token-chain.md §E.1): retry.
TRANSIENT_STATUSES = httpclient.TRANSIENT_STATUSES | {404, 410}
_AADSTS = re.compile(r"AADSTS(\d+)")
_FEDERATED_RECORD = {"70021", "700211", "700212", "700213", "7002137", "7002138"}


@dataclass(frozen=True, slots=True)
class Context:
    """What the fixes name: the identity in use and where its token comes from."""

    credential: str  # "workload_identity" | "managed_identity"
    host: str  # the Entra authority or IMDS host
    resource: str
    client_id: str = ""
    tenant_id: str = ""
    assertion_iss: str = ""  # the federated token's claims, for the federated-credential fix
    assertion_sub: str = ""


def classify(exc: BaseException, ctx: Context) -> BrokerError:
    """The BrokerError for anything ``get_token`` raised (never a token in the text)."""
    if isinstance(exc, BrokerError):
        return exc
    reply = _reply(exc)
    if reply is not None:
        error = httpclient.upstream_error(Step.AZURE, reply, transient=TRANSIENT_STATUSES)
        fix = _fix_for_answer(error, ctx)
        return error.with_fix(fix) if fix else error
    return _without_answer(exc, ctx)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _reply(exc: BaseException) -> httpclient.Reply | None:
    """The HTTP answer azure-core attached to the exception (or a cause of it), if any."""
    for item in _chain(exc):
        response: Any = getattr(item, "response", None)
        status = getattr(response, "status_code", None)
        if not isinstance(status, int):
            continue
        return httpclient.Reply(status, _body(response), _headers(response))
    return None


def _body(response: Any) -> bytes:
    """The body azure-core read: ``body()`` (transport responses) or ``content`` (azure.core.rest)."""
    for name in ("body", "content"):
        try:
            value = getattr(response, name)
            value = value() if callable(value) else value
        except Exception:  # not this response type, or a streamed body never read
            continue
        if isinstance(value, bytes):
            return value
    return b""


def _headers(response: Any) -> dict[str, str]:
    try:
        return {str(k): str(v) for k, v in response.headers.items()}
    except Exception:
        return {}


def _fix_for_answer(error: BrokerError, ctx: Context) -> str:
    text = f"{error.code} {error.reason}"
    match = _AADSTS.search(text)
    aadsts = match.group(1) if match else ""
    setting = "azure-resource (or credential_source.azure_resource)"
    if aadsts in _FEDERATED_RECORD:
        iss = ctx.assertion_iss or "AKS_OIDC_ISSUER"
        sub = ctx.assertion_sub or "system:serviceaccount:NAMESPACE:SERVICE_ACCOUNT"
        return (
            f"Entra ID has no federated credential on identity {ctx.client_id or 'AZURE_CLIENT_ID'} that "
            "matches the token file; add one (for an app registration: az ad app federated-credential "
            "create, same issuer, subject and audience):\n"
            "az identity federated-credential create --name wif-broker "
            f"--identity-name IDENTITY --resource-group RG --issuer {iss} --subject {sub} "
            f"--audiences {FEDERATED_AUDIENCE}"
        )
    if aadsts == "700024":
        return (
            "the federated token file holds an expired token: mount the projected token as a directory "
            "(never subPath) so the kubelet's rotation reaches it, and check this node's clock"
        )
    if aadsts == "700016":
        return (
            f"AZURE_CLIENT_ID {ctx.client_id} is not an app or managed identity in tenant {ctx.tenant_id}: "
            "check the service account annotation azure.workload.identity/client-id"
        )
    if aadsts in ("90002", "900023"):
        return f"AZURE_TENANT_ID {ctx.tenant_id!r} is not an Entra tenant: check the webhook's configuration"
    if aadsts == "501051":
        return (
            f"the application {ctx.resource} requires an app role assignment: assign the identity a role "
            "on it, or turn 'Assignment required' off on its enterprise application"
        )
    if aadsts in ("500011", "500014") or error.code == "invalid_resource":
        return (
            f"Entra ID has no application {ctx.resource!r} in this tenant: set {setting} to the "
            "Application ID URI of an app registration that exposes an API"
        )
    if aadsts in ("700027", "50013", "5002727"):
        return "the federated token file is not signed by the issuer of the identity's federated credential"
    if error.code == "bad_request_102":
        return "send the header 'Metadata: true' to IMDS (azure-identity does)"
    if ctx.credential == "managed_identity" and error.upstream_status == 400:
        return (
            "set AZURE_CLIENT_ID to the client ID of a user-assigned identity attached to this VM/VMSS, "
            "or assign it a managed identity:\n"
            "az vm identity assign --resource-group RG --name VM"
        )
    if error.upstream_status in (401, 403) and ctx.credential == "managed_identity":
        return "IMDS refused the request: it must come from the VM itself, without a proxy in between"
    return ""


def _message(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def _without_answer(exc: BaseException, ctx: Context) -> BrokerError:
    chain = _chain(exc)
    if any(
        isinstance(e, ssl.SSLCertVerificationError | aiohttp.ClientConnectorCertificateError) for e in chain
    ):
        return Denied(
            Step.AZURE,
            f"the TLS certificate of {ctx.host} is not trusted",
            fix="if a TLS-inspecting proxy sits in between, point SSL_CERT_FILE at a bundle with its CA",
        )
    if ctx.credential == "managed_identity" and "IMDS" in _message(exc):
        return Transient(
            Step.AZURE,
            f"Azure IMDS at {ctx.host} did not answer",
            fix=(
                "run on an Azure VM/VMSS with a managed identity; on AKS set up workload identity "
                '(pod label azure.workload.identity/use: "true"); IMDS cannot be reached through a proxy'
            ),
        )
    for item in chain:
        if isinstance(item, TimeoutError):
            return Transient(Step.AZURE, f"timed out talking to {ctx.host}")
        if isinstance(item, aiohttp.ClientError | ServiceRequestError | ServiceResponseError):
            return Transient(Step.AZURE, f"cannot reach {ctx.host}: {_message(item)}")
        if isinstance(item, OSError) and getattr(item, "filename", None):
            return Transient(
                Step.AZURE,
                f"cannot read the federated token file {item.filename}: {item.strerror}",
                fix="the workload identity webhook mounts it: check the pod label "
                'azure.workload.identity/use: "true" and the service account annotation',
            )
        if isinstance(item, ValueError):
            return Denied(Step.AZURE, _message(item))
    return Transient(Step.AZURE, _message(exc))

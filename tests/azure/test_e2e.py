"""The Azure paths end to end, each ending with real clients (gcloud, google-auth) through the broker.

Per path: FakeAzure (IMDS over http, Entra ID over TLS with a test CA, an AKS
OIDC issuer) and FakeGoogle, whose STS is configured as the provider for that
path (Entra v2 issuer + the app's client ID as audience, or the AKS issuer);
the production daemon in-process; then ``gcloud auth print-access-token`` and
google-auth ``default()`` + ``refresh()`` with the env bundle only (no Azure
variables, no test CA). Their tokens must be ones FakeIam minted.

1. IMDS url source: the file gcloud writes for ``--azure`` (``"Metadata": "True"``).
2. ``source = azure``, managed identity: file-less (system-assigned) and the
   ``credential_source.azure_resource`` file (user-assigned via AZURE_CLIENT_ID).
3. ``source = azure``, AKS workload identity: the same file, the webhook's env.
4. AKS projected token taken directly: a file source, provider on the AKS issuer
   (a dedicated projected volume, or the workload identity webhook's own token).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.fakes import DEFAULT_SERVICE_ACCOUNT, FakeGoogle
from tests.aws._harness import described_broker
from tests.azure._harness import (
    AKS_TOKEN_CREDENTIALS,
    IDENTITY_CREDENTIALS,
    VM_CREDENTIALS,
    assert_clients_got_iam_tokens,
    azure_calls,
    azure_latency_observations,
    broker_settings,
    example,
    identity,
    real_clients,
    token_response,
    write,
)
from tests.conftest import credential_info, require_tool
from tests.fakes.azure import (
    DEFAULT_APP,
    FEDERATED_AUDIENCE,
    SYSTEM_ASSIGNED,
    USER_ASSIGNED,
    EntraApp,
    FakeAzure,
    FakeEntraTenant,
)

pytestmark = pytest.mark.client
SUBJECT = "system:serviceaccount:default:app"


def _principal(google: FakeGoogle, subject: str) -> str:
    pool = google.audience.removeprefix("//iam.googleapis.com/").split("/providers/")[0]
    return f"principal://iam.googleapis.com/{pool}/subject/{subject}"


def _sts_subjects(google: FakeGoogle) -> set[str]:
    return {issued.subject for issued in google.sts.issued.values()}


async def test_imds_url_source_as_gcloud_writes_it(tmp_path: Path) -> None:
    """The unmodified ``--azure`` file: ``Metadata: True`` goes out as ``true``, string numbers are fine."""
    gcloud = require_tool("gcloud")
    async with FakeAzure() as azure, FakeGoogle() as google:
        azure.google_provider(google.sts)
        info = example(VM_CREDENTIALS, google, azure.imds_base)
        assert info["credential_source"]["headers"] == {"Metadata": "True"}
        cred_file = write(tmp_path, info)
        async with described_broker(broker_settings(credentials=str(cred_file))) as (broker, logs):
            clients = await real_clients(broker, tmp_path, gcloud)
            seen = await identity(logs)

    assert_clients_got_iam_tokens(clients, google)
    assert azure.imds.calls, "IMDS was never asked"
    for call in azure.imds.calls:
        assert call.headers["metadata"] == "true"  # the fake answers 400 to anything else
    assert {q["resource"] for q in azure.imds.queries} == {DEFAULT_APP.app_id_uri}
    assert _sts_subjects(google) == {SYSTEM_ASSIGNED.object_id}
    assert seen["kind"] == "url"
    assert seen["iss"] == azure.tenant.v2.issuer
    assert seen["aud"] == DEFAULT_APP.client_id


@pytest.mark.parametrize("assignment", ["system-assigned", "user-assigned"])
async def test_source_azure_managed_identity(
    assignment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """azure-identity's ManagedIdentityCredential against IMDS; no request to the file's url."""
    gcloud = require_tool("gcloud")
    async with FakeAzure() as azure, FakeGoogle() as google:
        azure.google_provider(google.sts)
        user = assignment == "user-assigned"
        for key, value in azure.managed_identity_env(USER_ASSIGNED.client_id if user else None).items():
            monkeypatch.setenv(key, value)
        if user:
            # The azure_resource file; its url still names the real IMDS, which must not be asked
            # (tests/azure/conftest.py fails the test on any non-loopback connection).
            resolved = broker_settings(
                credentials=str(write(tmp_path, example(IDENTITY_CREDENTIALS, google)))
            )
        else:
            resolved = broker_settings(
                audience=google.audience,
                service_account=DEFAULT_SERVICE_ACCOUNT,
                source="azure",
                azure_resource=DEFAULT_APP.app_id_uri,
                token_url=google.token_url,
                iam_endpoint=google.iam_base_url,
            )
        ok, timed = azure_calls(), azure_latency_observations()
        async with described_broker(resolved) as (broker, logs):
            clients = await real_clients(broker, tmp_path, gcloud)
            seen = await identity(logs)

    assert_clients_got_iam_tokens(clients, google)
    identity_used = USER_ASSIGNED if user else SYSTEM_ASSIGNED
    assert _sts_subjects(google) == {identity_used.object_id}
    assert azure.imds.calls
    assert not azure.entra.calls
    assert all(call.headers["metadata"] == "true" for call in azure.imds.calls)
    # azure-identity strips "/.default" from the scope to name the resource; client_id selects the UAMI.
    assert {q["resource"] for q in azure.imds.queries} == {DEFAULT_APP.app_id_uri}
    assert {q.get("client_id") for q in azure.imds.queries} == {USER_ASSIGNED.client_id if user else None}
    assert azure_calls() > ok
    assert azure_latency_observations() > timed
    assert seen["kind"] == "azure"
    assert seen["credential"] == "managed_identity"
    assert seen["client_id"] == (USER_ASSIGNED.client_id if user else "system-assigned")
    assert seen["token_version"] == "2.0"
    assert seen["provider_issuer_uri"] == azure.tenant.v2.issuer
    assert seen["provider_allowed_audience"] == DEFAULT_APP.client_id
    assert seen["bind"] == _principal(google, identity_used.object_id)


async def test_source_azure_workload_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AKS workload identity: the federated token is exchanged at (fake, TLS) Entra ID."""
    gcloud = require_tool("gcloud")
    async with FakeAzure() as azure, FakeGoogle() as google:
        azure.google_provider(google.sts)
        for key, value in azure.workload_identity_env(tmp_path / "azure-identity-token").items():
            monkeypatch.setenv(key, value)
        cred_file = write(tmp_path, example(IDENTITY_CREDENTIALS, google))
        ok = azure_calls()
        async with described_broker(broker_settings(credentials=str(cred_file))) as (broker, logs):
            clients = await real_clients(broker, tmp_path, gcloud)
            seen = await identity(logs)

    assert_clients_got_iam_tokens(clients, google)
    assert _sts_subjects(google) == {USER_ASSIGNED.object_id}
    assert azure.entra.calls
    assert not azure.imds.calls
    for call in azure.entra.calls:
        form = call.form or {}
        assert call.path == f"/{azure.tenant.tenant_id}/oauth2/v2.0/token"
        assert form["grant_type"] == "client_credentials"
        assert form["client_id"] == USER_ASSIGNED.client_id
        assert form["scope"] == "api://wif-broker/.default"
        assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert azure_calls() > ok
    assert seen["credential"] == "workload_identity"
    assert seen["tenant_id"] == azure.tenant.tenant_id
    assert seen["provider_issuer_uri"] == azure.tenant.v2.issuer
    assert seen["provider_allowed_audience"] == DEFAULT_APP.client_id


@pytest.mark.parametrize("token", ["dedicated-volume", "webhook-token"])
async def test_aks_projected_token_file(token: str, tmp_path: Path) -> None:
    """The simplest AKS path: a projected token itself, provider on the AKS OIDC issuer.

    ``dedicated-volume``: a projected volume with the provider as audience (k8s/deployment.yaml).
    ``webhook-token``: the workload identity webhook's own token (audience
    api://AzureADTokenExchange), config/azure/credentials-aks-token.json.
    """
    gcloud = require_tool("gcloud")
    async with FakeAzure() as azure, FakeGoogle() as google:
        path = tmp_path / "token"
        if token == "dedicated-volume":
            audience = "https:" + google.audience
            info = credential_info(google, path)
        else:
            audience = FEDERATED_AUDIENCE
            info = example(AKS_TOKEN_CREDENTIALS, google)
            assert info["credential_source"]["file"] == "/var/run/secrets/azure/tokens/azure-identity-token"
            info["credential_source"]["file"] = str(path)
        azure.aks_provider(google.sts, [audience])
        path.write_text(azure.projected_token(audience, SUBJECT))
        cred_file = write(tmp_path, info)
        async with described_broker(broker_settings(credentials=str(cred_file))) as (broker, logs):
            clients = await real_clients(broker, tmp_path, gcloud)
            seen = await identity(logs)

    assert_clients_got_iam_tokens(clients, google)
    assert _sts_subjects(google) == {SUBJECT}
    assert not azure.imds.calls
    assert not azure.entra.calls
    assert seen["kind"] == "file"
    assert seen["iss"] == azure.aks.issuer
    assert seen["aud"] == audience


async def test_v1_tokens_name_the_sts_windows_net_issuer(monkeypatch: pytest.MonkeyPatch) -> None:
    """An app left at token version 1 (Entra's default): iss sts.windows.net, aud the resource as asked."""
    app = EntraApp(DEFAULT_APP.app_id_uri, DEFAULT_APP.client_id, token_version=1)
    async with FakeAzure(FakeEntraTenant(apps=[app])) as azure, FakeGoogle() as google:
        azure.google_provider(google.sts, app)
        for key, value in azure.managed_identity_env().items():
            monkeypatch.setenv(key, value)
        resolved = broker_settings(
            audience=google.audience,
            service_account=DEFAULT_SERVICE_ACCOUNT,
            source="azure",
            azure_resource=app.app_id_uri,
            token_url=google.token_url,
            iam_endpoint=google.iam_base_url,
        )
        async with described_broker(resolved) as (broker, logs):
            status, body = await token_response(broker)
            seen = await identity(logs)

    assert status == 200, body
    assert json.loads(body)["access_token"] in google.iam.issued_access
    tenant = azure.tenant.tenant_id
    assert seen["iss"] == f"https://sts.windows.net/{tenant}/"
    assert seen["token_version"] == "1.0"
    assert seen["provider_issuer_uri"] == f"https://sts.windows.net/{tenant}"  # as Google's guide writes it
    assert seen["provider_allowed_audience"] == "api://wif-broker"
    assert seen["appid"] == SYSTEM_ASSIGNED.client_id

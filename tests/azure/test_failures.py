"""Azure failures, as a client of the broker sees them: Transient (503) or Denied (403), with the fix.

Each test breaks one thing the way it breaks in production (no federated
credential, no token file, an untrusted certificate, an Entra or IMDS outage,
an unassigned identity, an unknown application, IMDS "updating") and reads the
broker's token endpoint. IMDS bodies for the url source are checked the same way.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker import httpclient
from broker.check import run_check
from broker.credconfig import AzureSource, CredentialConfig
from broker.errors import ConfigError
from broker.fakes import DEFAULT_SERVICE_ACCOUNT, FakeGoogle
from broker.sources import build_source
from tests.aws._harness import described_broker
from tests.azure._harness import (
    IDENTITY_CREDENTIALS,
    VM_CREDENTIALS,
    azure_calls,
    broker_settings,
    example,
    token_response,
    write,
)
from tests.fakes.azure import DEFAULT_APP, USER_ASSIGNED, FakeAzure


@asynccontextmanager
async def fakes() -> AsyncIterator[tuple[FakeAzure, FakeGoogle]]:
    async with FakeAzure() as azure, FakeGoogle() as google:
        azure.google_provider(google.sts)
        yield azure, google


def fileless(google: FakeGoogle, resource: str = DEFAULT_APP.app_id_uri) -> dict[str, Any]:
    return {
        "audience": google.audience,
        "service_account": DEFAULT_SERVICE_ACCOUNT,
        "source": "azure",
        "azure_resource": resource,
        "token_url": google.token_url,
        "iam_endpoint": google.iam_base_url,
    }


async def answer(**flags: Any) -> tuple[int, str]:
    async with described_broker(broker_settings(**flags)) as (broker, _):
        return await token_response(broker)


def setenv(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# source = azure, workload identity


async def test_no_federated_credential_is_denied_with_the_az_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fakes() as (azure, google):
        env = azure.workload_identity_env(tmp_path / "token", subject="system:serviceaccount:other:sa")
        setenv(monkeypatch, env)
        denied = azure_calls("denied")
        status, body = await answer(**fileless(google))
    assert status == 403, body
    assert "AADSTS70021" in body
    assert "az identity federated-credential create" in body
    assert f"--issuer {azure.aks.issuer} --subject system:serviceaccount:other:sa" in body
    assert "--audiences api://AzureADTokenExchange" in body
    assert "eyJ" not in body  # never a token
    assert azure_calls("denied") > denied


async def test_missing_token_file_is_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with fakes() as (azure, google):
        setenv(monkeypatch, azure.workload_identity_env(tmp_path / "token"))
        (tmp_path / "token").unlink()
        transient = azure_calls("transient")
        status, body = await answer(**fileless(google))
    assert status == 503, body
    assert f"cannot read the federated token file {tmp_path / 'token'}" in body
    assert 'azure.workload.identity/use: "true"' in body
    assert azure_calls("transient") > transient


async def test_untrusted_entra_certificate_is_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with fakes() as (azure, google):
        env = azure.workload_identity_env(tmp_path / "token")
        del env["SSL_CERT_FILE"]
        setenv(monkeypatch, env)
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        status, body = await answer(**fileless(google))
    assert status == 403, body
    assert "is not trusted" in body
    assert "SSL_CERT_FILE" in body


async def test_entra_outage_is_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with fakes() as (azure, google):
        setenv(monkeypatch, azure.workload_identity_env(tmp_path / "token"))
        azure.entra.fail_next(
            503, {"error": "temporarily_unavailable", "error_description": "AADSTS90033"}, 9
        )
        status, body = await answer(**fileless(google))
    assert status == 503, body
    assert "temporarily_unavailable" in body


async def test_http_authority_is_a_configuration_error(tmp_path: Path) -> None:
    """azure-identity refuses a plain-http authority; the broker says so at start-up (exit 2)."""
    token = tmp_path / "token"
    token.write_text("x")
    cred = CredentialConfig(
        "//iam.googleapis.com/x", "urn:ietf:params:oauth:token-type:jwt", "https://x", AzureSource("api://a")
    )
    env = {
        "AZURE_CLIENT_ID": USER_ASSIGNED.client_id,
        "AZURE_TENANT_ID": "t",
        "AZURE_FEDERATED_TOKEN_FILE": str(token),
        "AZURE_AUTHORITY_HOST": "http://127.0.0.1:1",
    }
    async with httpclient.new_session() as session:
        with pytest.raises(ConfigError, match=r"AZURE_AUTHORITY_HOST: .*https"):
            build_source(cred, session, environ=env)


# --------------------------------------------------------------------------------------------
# source = azure, managed identity (IMDS)


async def test_imds_unreachable_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    async with fakes() as (_, google):
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", f"http://127.0.0.1:{closed_port()}")
        status, body = await answer(**fileless(google))
    assert status == 503, body
    assert "did not answer" in body
    assert "Azure VM/VMSS with a managed identity" in body


async def test_unassigned_identity_is_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    async with fakes() as (azure, google):
        setenv(monkeypatch, azure.managed_identity_env("00000000-0000-4000-a000-000000000000"))
        status, body = await answer(**fileless(google))
    assert status == 403, body
    assert "Identity not found" in body
    assert "az vm identity assign" in body


async def test_unknown_application_is_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    async with fakes() as (azure, google):
        setenv(monkeypatch, azure.managed_identity_env())
        status, body = await answer(**fileless(google, "api://not-registered"))
    assert status == 403, body
    assert "AADSTS500011" in body
    assert "set azure-resource (or credential_source.azure_resource)" in body


async def test_imds_updating_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """IMDS answers 410 while it updates; azure-identity retries and the client never notices."""
    async with fakes() as (azure, google):
        setenv(monkeypatch, azure.managed_identity_env())
        azure.imds.fail_next(410, {"error": "gone", "error_description": "IMDS is updating"})
        status, body = await answer(**fileless(google))
    assert status == 200, body
    assert json.loads(body)["access_token"] in google.iam.issued_access
    assert len(azure.imds.calls) >= 2


# --------------------------------------------------------------------------------------------
# The IMDS url source (the gcloud --azure file)


async def test_fake_imds_is_as_strict_as_the_real_one() -> None:
    """Control: 'Metadata: True' is a 400 bad_request_102; 'true' gets string numbers."""
    async with FakeAzure() as azure, aiohttp.ClientSession() as session:
        url = azure.imds_token_url()
        async with session.get(url, headers={"Metadata": "True"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "bad_request_102"
        async with session.get(url, headers={"Metadata": "true"}) as resp:
            assert resp.status == 200
            reply = await resp.json()
    assert all(isinstance(reply[k], str) for k in ("expires_in", "expires_on", "not_before"))
    assert reply["resource"] == DEFAULT_APP.app_id_uri


@pytest.mark.parametrize(
    ("change", "status", "expected"),
    [
        ("resource=api://not-registered", 403, "not an Entra application ID URI"),
        ("no Metadata header", 403, "send the header 'Metadata: true'"),
        ("IMDS down", 503, "cannot reach"),
    ],
)
async def test_imds_errors_reach_the_client_with_the_fix(
    change: str, status: int, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fakes() as (azure, google):
        base = f"http://127.0.0.1:{closed_port()}" if change == "IMDS down" else azure.imds_base
        info = example(VM_CREDENTIALS, google, base)
        source = info["credential_source"]
        if change.startswith("resource="):
            source["url"] = source["url"].replace("resource=api://wif-broker", change)
        if change == "no Metadata header":
            del source["headers"]
        got, body = await answer(credentials=str(write(tmp_path, info)))
    assert got == status, body
    assert expected in body
    if change.startswith("resource="):
        assert "invalid_resource: AADSTS500011" in body
    if change == "no Metadata header":
        assert "bad_request_102: Required metadata header not specified" in body


# --------------------------------------------------------------------------------------------
# wif-broker check


async def test_check_prints_the_provider_settings_the_token_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with fakes() as (azure, google):
        setenv(monkeypatch, azure.workload_identity_env(tmp_path / "token"))
        cred_file = write(tmp_path, example(IDENTITY_CREDENTIALS, google))
        code = await run_check(broker_settings(credentials=str(cred_file)))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ok    native identity (azure): credential=workload_identity" in out
    assert f"provider_issuer_uri={azure.tenant.v2.issuer}" in out
    assert f"provider_allowed_audience={DEFAULT_APP.client_id}" in out
    assert "token_version=2.0" in out
    assert "bind roles/iam.workloadIdentityUser to: principal://iam.googleapis.com/" in out
    assert "eyJ" not in out

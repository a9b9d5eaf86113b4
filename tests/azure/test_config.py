"""The Azure credential files and settings, parsed: what each one makes the broker do.

``credential_source.azure_resource`` is the wif-broker key that selects
azure-identity in a credential file. It sits next to the url gcloud writes, which
google-auth keeps using (it ignores the key), so one file serves both.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.auth import identity_pool

from broker import credconfig, httpclient, settings
from broker.credconfig import AzureSource, UrlSource
from broker.errors import ConfigError
from broker.sources import build_source
from broker.sources.azure import AzureTokenSource, scope_of
from tests.azure._harness import IDENTITY_CREDENTIALS, PLACEHOLDERS, VM_CREDENTIALS

AUDIENCE = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/p/providers/x"


def load(path: Any) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    for key, value in PLACEHOLDERS.items():
        text = text.replace(key, value)
    info: dict[str, Any] = json.loads(text)
    return info


def test_gcloud_azure_file_is_a_url_source_with_the_header_as_written() -> None:
    cred = credconfig.parse(load(VM_CREDENTIALS))
    assert isinstance(cred.source, UrlSource)
    assert cred.source.headers == (("Metadata", "True"),)  # sent as "true" (tests/azure/test_e2e.py)
    assert cred.source.format == credconfig.TokenFormat("json", "access_token")
    assert cred.service_account_email == "app@my-project.iam.gserviceaccount.com"


def test_azure_resource_selects_azure_identity() -> None:
    cred = credconfig.parse(load(IDENTITY_CREDENTIALS))
    assert cred.source == AzureSource("api://wif-broker")
    assert cred.subject_token_type == "urn:ietf:params:oauth:token-type:jwt"


def test_google_auth_accepts_the_azure_resource_file_as_is() -> None:
    """The extension key does not break the file for google-auth (it uses the url)."""
    creds = identity_pool.Credentials.from_info(load(IDENTITY_CREDENTIALS))
    assert isinstance(creds, identity_pool.Credentials)


def test_azure_resource_alone_is_enough_for_the_broker() -> None:
    info = load(IDENTITY_CREDENTIALS)
    info["credential_source"] = {"azure_resource": "3c1f6a52-0000-4000-a000-0000000a99c1"}
    assert credconfig.parse(info).source == AzureSource("3c1f6a52-0000-4000-a000-0000000a99c1")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"environment_id": "aws1"}, "credential_source.azure_resource: needs a JWT subject_token_type"),
        ({"azure_resource": 7}, "credential_source.azure_resource: must be a string"),
        ({"azure_resource": "api://a b"}, "credential_source.azure_resource: 'api://a b' is not a URI"),
    ],
)
def test_azure_resource_mistakes_are_named(change: dict[str, Any], message: str) -> None:
    info = load(IDENTITY_CREDENTIALS)
    info["credential_source"].update(change)
    with pytest.raises(ConfigError, match=message):
        credconfig.parse(info)


def test_azure_resource_needs_a_jwt_token_type() -> None:
    info = load(IDENTITY_CREDENTIALS)
    info["subject_token_type"] = credconfig.AWS_TOKEN_TYPE
    with pytest.raises(ConfigError, match="azure_resource: needs a JWT subject_token_type"):
        credconfig.parse(info)


def test_fileless_azure_defaults_and_auto_detection() -> None:
    flags = {"audience": AUDIENCE, "service_account": "app@my-project.iam.gserviceaccount.com"}
    resolved = settings.build({**flags, "source": "azure"}, environ={})
    assert resolved.cred.source == AzureSource(
        "https://iam.googleapis.com/" + AUDIENCE.removeprefix("//iam.googleapis.com/")
    )
    resolved = settings.build({**flags, "source": "azure", "azure_resource": "api://wif-broker"}, environ={})
    assert resolved.cred.source == AzureSource("api://wif-broker")
    aks = {"AZURE_FEDERATED_TOKEN_FILE": "/t", "AZURE_CLIENT_ID": "c", "AZURE_TENANT_ID": "t"}
    resolved = settings.build({**flags, "azure_resource": "api://wif-broker"}, environ=aks)
    assert resolved.cred.source == AzureSource("api://wif-broker")


@pytest.mark.parametrize(
    ("resource", "scope"),
    [
        ("api://wif-broker", "api://wif-broker/.default"),
        ("3c1f6a52-0000-4000-a000-0000000a99c1", "3c1f6a52-0000-4000-a000-0000000a99c1/.default"),
        # A trailing slash is part of a v1 resource; azure-identity strips "/.default" back to it.
        ("https://iam.googleapis.com/", "https://iam.googleapis.com//.default"),
        ("api://wif-broker/.default", "api://wif-broker/.default"),
    ],
)
def test_scope_round_trips_to_the_resource(resource: str, scope: str) -> None:
    assert scope_of(resource) == scope


async def test_close_is_idempotent_and_leaves_the_shared_session_open() -> None:
    """The credential sends through the broker's session; closing it must not close that session."""
    cred = credconfig.parse(load(IDENTITY_CREDENTIALS))
    async with httpclient.new_session() as session:
        source = build_source(cred, session, environ={})
        assert isinstance(source, AzureTokenSource)
        assert source.kind == "azure"
        await source.close()
        await source.close()
        assert not session.closed

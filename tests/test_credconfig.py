"""The external_account file (token-chain.md §C), accepted as gcloud writes it.

Pure parsing: ``credconfig.parse`` on the decoded object, ``load_file`` on disk.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from broker import credconfig
from broker.credconfig import AwsSource, FileSource, TokenFormat, UrlSource
from broker.errors import ConfigError

POOLS = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools"
AUDIENCE = f"{POOLS}/pool/providers/prov"
JWT = "urn:ietf:params:oauth:token-type:jwt"
SA = "sa@proj.iam.gserviceaccount.com"
IMPERSONATION_URL = (
    f"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"
)

# token-chain.md §C.3, verbatim (audiences split only for line length).
AWS_EXAMPLE: dict[str, Any] = {
    "type": "external_account",
    "audience": f"{POOLS}/aws-pool/providers/aws-provider",
    "subject_token_type": "urn:ietf:params:aws:token-type:aws4_request",
    "service_account_impersonation_url": IMPERSONATION_URL,
    "service_account_impersonation": {"token_lifetime_seconds": 3600},
    "token_url": "https://sts.googleapis.com/v1/token",
    "credential_source": {
        "environment_id": "aws1",
        "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone",
        "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials",
        "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
        "imdsv2_session_token_url": "http://169.254.169.254/latest/api/token",
    },
    "universe_domain": "googleapis.com",
}
AZURE_EXAMPLE: dict[str, Any] = {
    "type": "external_account",
    "audience": f"{POOLS}/azure-pool/providers/azure-provider",
    "subject_token_type": JWT,
    "token_url": "https://sts.googleapis.com/v1/token",
    "service_account_impersonation_url": IMPERSONATION_URL,
    "credential_source": {
        "url": "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api://my-app",
        "headers": {"Metadata": "True"},
        "format": {"type": "json", "subject_token_field_name": "access_token"},
    },
}
K8S_EXAMPLE: dict[str, Any] = {
    "type": "external_account",
    "audience": f"{POOLS}/k8s-pool/providers/aks-cluster",
    "subject_token_type": JWT,
    "token_url": "https://sts.googleapis.com/v1/token",
    "service_account_impersonation_url": IMPERSONATION_URL,
    "credential_source": {"file": "/var/run/service-account/token", "format": {"type": "text"}},
}


def minimal(**overrides: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": "external_account",
        "audience": AUDIENCE,
        "subject_token_type": JWT,
        "credential_source": {"file": "/var/run/service-account/token"},
    }
    info.update(overrides)
    return info


def refused(info: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        credconfig.parse(info)
    return caught.value


# --- accepted ---------------------------------------------------------------------------------


def test_minimal_file_source_defaults() -> None:
    cred = credconfig.parse(minimal())
    assert cred.source == FileSource("/var/run/service-account/token", TokenFormat("text", ""))
    assert cred.token_url == "https://sts.googleapis.com/v1/token"
    assert cred.universe_domain == "googleapis.com"
    assert cred.impersonation_url == ""
    assert cred.service_account_email == ""
    assert cred.token_lifetime_seconds == 3600
    assert cred.quota_project_id == ""
    assert cred.project_number == "123456789012"


def test_file_source_json_format() -> None:
    source = {"file": "/t.json", "format": {"type": "json", "subject_token_field_name": "id_token"}}
    cred = credconfig.parse(minimal(credential_source=source))
    assert cred.source == FileSource("/t.json", TokenFormat("json", "id_token"))


def test_json_format_requires_field_name() -> None:
    error = refused(minimal(credential_source={"file": "/t.json", "format": {"type": "json"}}))
    assert error.name == "credential_source.format.subject_token_field_name"


def test_unknown_format_type_refused() -> None:
    error = refused(minimal(credential_source={"file": "/t", "format": {"type": "xml"}}))
    assert error.name == "credential_source.format.type"


def test_url_source_with_headers_and_json_format() -> None:
    source = {
        "url": "http://127.0.0.1:9/token",
        "headers": {"Metadata": "True", "X-Other": "1"},
        "format": {"type": "json", "subject_token_field_name": "access_token"},
    }
    cred = credconfig.parse(minimal(credential_source=source))
    assert cred.source == UrlSource(
        "http://127.0.0.1:9/token",
        (("Metadata", "True"), ("X-Other", "1")),
        TokenFormat("json", "access_token"),
    )


def test_url_source_text_format_no_headers() -> None:
    cred = credconfig.parse(minimal(credential_source={"url": "https://idp.example/token"}))
    assert cred.source == UrlSource("https://idp.example/token", (), TokenFormat())


def test_headers_must_be_strings() -> None:
    error = refused(minimal(credential_source={"url": "https://idp.example/t", "headers": {"A": 1}}))
    assert error.name == "credential_source.headers"


def test_file_and_url_are_exclusive() -> None:
    error = refused(minimal(credential_source={"file": "/t", "url": "https://idp.example/t"}))
    assert error.name == "credential_source"


def test_default_token_url_follows_universe_domain() -> None:
    cred = credconfig.parse(minimal(universe_domain="example.goog"))
    assert cred.universe_domain == "example.goog"
    assert cred.token_url == "https://sts.example.goog/v1/token"


def test_explicit_token_url_wins_over_universe() -> None:
    cred = credconfig.parse(
        minimal(universe_domain="example.goog", token_url="https://sts.regional.example/v1/token")
    )
    assert cred.token_url == "https://sts.regional.example/v1/token"


def test_impersonation_url_gives_email() -> None:
    cred = credconfig.parse(minimal(service_account_impersonation_url=IMPERSONATION_URL))
    assert cred.impersonation_url == IMPERSONATION_URL
    assert cred.service_account_email == SA


def test_impersonation_url_must_name_the_account() -> None:
    error = refused(minimal(service_account_impersonation_url="https://iamcredentials.googleapis.com/v1/x"))
    assert error.name == "service_account_impersonation_url"


def test_token_lifetime_seconds() -> None:
    cred = credconfig.parse(
        minimal(
            service_account_impersonation_url=IMPERSONATION_URL,
            service_account_impersonation={"token_lifetime_seconds": 7200},
        )
    )
    assert cred.token_lifetime_seconds == 7200


@pytest.mark.parametrize("value", ["3600", 3600.5, True, 10, 50000, None])
def test_bad_token_lifetime_seconds(value: Any) -> None:
    error = refused(minimal(service_account_impersonation={"token_lifetime_seconds": value}))
    assert error.name == "service_account_impersonation.token_lifetime_seconds"


def test_quota_project_id() -> None:
    assert credconfig.parse(minimal(quota_project_id="billing-proj")).quota_project_id == "billing-proj"


def test_ignored_fields_accepted() -> None:
    # gcloud/google-auth-only fields that the broker has no use for must not break the file.
    info = minimal(
        token_info_url="https://sts.googleapis.com/v1/introspect",
        trust_boundary={"locations": []},
    )
    assert credconfig.parse(info).audience == AUDIENCE


def test_aws_example_parses() -> None:
    cred = credconfig.parse(copy.deepcopy(AWS_EXAMPLE))
    assert cred.subject_token_type == credconfig.AWS_TOKEN_TYPE
    assert cred.source == AwsSource(
        regional_cred_verification_url=AWS_EXAMPLE["credential_source"]["regional_cred_verification_url"],
        region_url="http://169.254.169.254/latest/meta-data/placement/availability-zone",
        url="http://169.254.169.254/latest/meta-data/iam/security-credentials",
        imdsv2_session_token_url="http://169.254.169.254/latest/api/token",
    )
    assert cred.service_account_email == SA
    assert cred.token_lifetime_seconds == 3600
    assert cred.project_number == "123456789012"


def test_aws_environment_id_version_checked() -> None:
    info = copy.deepcopy(AWS_EXAMPLE)
    info["credential_source"]["environment_id"] = "aws2"
    assert refused(info).name == "credential_source.environment_id"


def test_azure_example_parses() -> None:
    cred = credconfig.parse(copy.deepcopy(AZURE_EXAMPLE))
    assert isinstance(cred.source, UrlSource)
    assert cred.source.url.startswith("http://169.254.169.254/metadata/identity/oauth2/token?")
    assert cred.source.headers == (("Metadata", "True"),)
    assert cred.source.format == TokenFormat("json", "access_token")
    assert cred.service_account_email == SA


def test_k8s_example_parses() -> None:
    cred = credconfig.parse(copy.deepcopy(K8S_EXAMPLE))
    assert cred.source == FileSource("/var/run/service-account/token", TokenFormat("text", ""))
    assert cred.token_url == "https://sts.googleapis.com/v1/token"
    assert cred.service_account_email == SA


@pytest.mark.parametrize("example", [AWS_EXAMPLE, AZURE_EXAMPLE, K8S_EXAMPLE], ids=["aws", "azure", "k8s"])
def test_examples_load_from_disk(tmp_path: Path, example: dict[str, Any]) -> None:
    path = tmp_path / "cred.json"
    path.write_text(json.dumps(example, indent=2))
    assert credconfig.parse(credconfig.load_file(str(path))).audience == example["audience"]


# --- refused by name --------------------------------------------------------------------------


def test_executable_source_refused() -> None:
    source = {"executable": {"command": "/bin/get-token", "timeout_millis": 5000}}
    error = refused(minimal(credential_source=source))
    assert error.name == "credential_source.executable"
    assert "not supported" in error.problem


@pytest.mark.parametrize(
    "certificate",
    [
        {"use_default_certificate_config": True},
        {"certificate_config_location": "/c.json", "trust_chain_path": "/chain.pem"},
    ],
)
def test_certificate_source_refused(certificate: dict[str, Any]) -> None:
    error = refused(minimal(credential_source={"certificate": certificate}))
    assert error.name == "credential_source.certificate"
    assert "not supported" in error.problem


def test_workforce_pool_user_project_on_workload_audience_refused() -> None:
    assert refused(minimal(workforce_pool_user_project="123456")).name == "workforce_pool_user_project"


def test_workforce_audience_refused() -> None:
    audience = "//iam.googleapis.com/locations/global/workforcePools/pool/providers/prov"
    error = refused(
        minimal(audience=audience, subject_token_type="urn:ietf:params:oauth:token-type:id_token")
    )
    assert error.name == "audience"
    assert "workforce" in error.problem


@pytest.mark.parametrize("key", ["client_id", "client_secret"])
def test_client_credentials_refused(key: str) -> None:
    assert refused(minimal(**{key: "x"})).name == key


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"type": "service_account"}, "type"),
        ({"type": "external_account_authorized_user"}, "type"),
        ({"type": None}, "type"),
        ({"audience": None}, "audience"),
        ({"audience": 5}, "audience"),
        ({"subject_token_type": None}, "subject_token_type"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, "subject_token_type"),
        ({"subject_token_type": "bogus"}, "subject_token_type"),
        ({"credential_source": None}, "credential_source"),
        ({"credential_source": "file"}, "credential_source"),
        ({"token_url": "sts.googleapis.com/v1/token"}, "token_url"),
        ({"token_url": "http://[bad"}, "token_url"),
        ({"service_account_impersonation_url": "ftp://x/y"}, "service_account_impersonation_url"),
        ({"service_account_impersonation": 3600}, "service_account_impersonation"),
        ({"credential_source": {"url": "not a url"}}, "credential_source.url"),
        ({"quota_project_id": 7}, "quota_project_id"),
    ],
)
def test_bad_fields_named(overrides: dict[str, Any], field: str) -> None:
    assert refused(minimal(**overrides)).name == field


def test_aws_source_needs_aws_token_type() -> None:
    source = dict(AWS_EXAMPLE["credential_source"])
    assert refused(minimal(credential_source=source)).name == "subject_token_type"


# --- load_file --------------------------------------------------------------------------------


def test_load_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        credconfig.load_file(str(tmp_path / "nope.json"))
    assert caught.value.name == "credentials"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"external_account"'])
def test_load_file_not_an_object(tmp_path: Path, text: str) -> None:
    path = tmp_path / "cred.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        credconfig.load_file(str(path))
    assert caught.value.name == "credentials"

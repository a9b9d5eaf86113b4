"""Which credential configuration the settings describe: a file, or file-less flags.

File-less mode builds the same :class:`CredentialConfig` a credential file would
give, from ``audience`` and ``source`` (``auto`` detects the platform from the
environment the platform injects).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker import credconfig
from broker.credconfig import AwsSource, AzureSource, CredentialConfig, FileSource, TokenFormat, UrlSource
from broker.errors import ConfigError

JWT = "urn:ietf:params:oauth:token-type:jwt"
K8S_TOKEN_PATHS = ("/var/run/service-account/token", "/var/run/secrets/tokens/gcp-token")


def _fileless(values: dict[str, Any], environ: Mapping[str, str]) -> CredentialConfig:
    audience = values["audience"]
    source_text: str = values["source"]
    universe = "googleapis.com"
    source: credconfig.CredentialSource
    token_type = JWT
    if source_text == "auto":
        source_text = _detect_source(environ)
    if source_text.startswith("file:"):
        source = FileSource(source_text[5:])
        if not source.path:
            raise ConfigError("source", "file: needs a path")
    elif source_text.startswith("url:"):
        source = UrlSource(credconfig.check_url("source", source_text[4:]), (), TokenFormat())
    elif source_text == "aws":
        source = AwsSource("https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15")
        token_type = credconfig.AWS_TOKEN_TYPE
    elif source_text == "azure":
        resource = values["azure-resource"] or "https://iam.googleapis.com/" + audience.removeprefix(
            "//iam.googleapis.com/"
        )
        source = AzureSource(resource)
    else:
        raise ConfigError("source", f"{source_text!r} is not auto, aws, azure, file:PATH or url:URL")
    # Parse a minimal file just to run the audience checks; its source is a dummy.
    info = {"type": "external_account", "audience": audience, "subject_token_type": JWT}
    base = credconfig.parse({**info, "credential_source": {"file": "-"}})
    return CredentialConfig(
        audience=base.audience,
        subject_token_type=token_type,
        token_url=credconfig.default_token_url(universe),
        source=source,
        universe_domain=universe,
    )


def _detect_source(environ: Mapping[str, str]) -> str:
    if all(environ.get(k) for k in ("AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID")):
        return "azure"
    aws_markers = (
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_ACCESS_KEY_ID",
    )
    if any(environ.get(k) for k in aws_markers):
        return "aws"
    for path in K8S_TOKEN_PATHS:
        if Path(path).is_file():
            return "file:" + path
    raise ConfigError(
        "source", "auto found no AWS, Azure or Kubernetes token in the environment; set it explicitly"
    )


def credential_config(values: dict[str, Any], environ: Mapping[str, str]) -> CredentialConfig:
    explicit = values["credentials"]
    if values["audience"]:
        if explicit:
            raise ConfigError("credentials", "give either a credential file or audience/source, not both")
        return _fileless(values, environ)
    path = explicit or environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if not path:
        raise ConfigError(
            "credentials",
            "no credential file (set --credentials or GOOGLE_APPLICATION_CREDENTIALS) "
            "and no --audience for file-less mode",
        )
    return credconfig.parse(credconfig.load_file(path))

"""The ``external_account`` credential file, parsed into frozen values.

Accepted exactly as ``gcloud iam workload-identity-pools create-cred-config``
writes it (reference/token-chain.md §C). Variants the broker does not run are
refused by name at start-up instead of failing on the first request.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.errors import ConfigError

AWS_TOKEN_TYPE = "urn:ietf:params:aws:token-type:aws4_request"
JWT_TOKEN_TYPES = (
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
)
SAML_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:saml2"
_WORKFORCE_AUDIENCE = re.compile(r"//iam\.googleapis\.com/locations/[^/]+/workforcePools/")
_PROJECT_NUMBER = re.compile(r"/projects/(\d+)/")
_IMPERSONATION_URL = re.compile(r"/serviceAccounts/([^/:]+):generateAccessToken$")


@dataclass(frozen=True, slots=True)
class TokenFormat:
    """How to pull the subject token out of a file or URL response."""

    type: str = "text"  # "text" | "json"
    subject_token_field_name: str = ""


@dataclass(frozen=True, slots=True)
class FileSource:
    path: str
    format: TokenFormat = TokenFormat()


@dataclass(frozen=True, slots=True)
class UrlSource:
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    format: TokenFormat = TokenFormat()


@dataclass(frozen=True, slots=True)
class AwsSource:
    regional_cred_verification_url: str
    region_url: str = ""
    url: str = ""
    imdsv2_session_token_url: str = ""


@dataclass(frozen=True, slots=True)
class AzureSource:
    """azure-identity supplies the token for ``resource``.

    File-less ``source = azure``, or ``credential_source.azure_resource`` in a
    credential file (a wif-broker extension that google-auth ignores, so a
    gcloud-generated Azure file keeps working for both).
    """

    resource: str


CredentialSource = FileSource | UrlSource | AwsSource | AzureSource


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    audience: str
    subject_token_type: str
    token_url: str
    source: CredentialSource
    impersonation_url: str = ""
    service_account_email: str = ""
    token_lifetime_seconds: int = 3600
    quota_project_id: str = ""
    universe_domain: str = "googleapis.com"
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def project_number(self) -> str:
        match = _PROJECT_NUMBER.search(self.audience)
        return match.group(1) if match else ""


def load_file(path: str) -> dict[str, Any]:
    """Read and JSON-decode the file; errors name the ``credentials`` setting."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("credentials", f"file {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError("credentials", f"cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("credentials", f"{path!r} is not UTF-8 (byte {exc.start})") from None
    try:
        info = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            "credentials", f"{path!r} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    except RecursionError:
        raise ConfigError("credentials", f"{path!r} is nested too deeply to be a credential file") from None
    except ValueError:
        # int() refuses more than sys.get_int_max_str_digits() digits; _finite refuses 1e999999.
        raise ConfigError("credentials", f"{path!r} holds a number out of range") from None
    if not isinstance(info, dict):
        raise ConfigError("credentials", f"{path!r} must hold a JSON object")
    return info


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")  # NaN, Infinity: Python extensions, not JSON


def check_url(name: str, value: str) -> str:
    problem = f"{value!r} is not an http(s) URL"
    try:
        parts = urlsplit(value)
        _ = parts.port  # urlsplit defers port (and some bracket) errors until asked
    except ValueError:
        # e.g. "http://[bad" or "https://host:99999": must be a ConfigError, not a traceback
        raise ConfigError(name, problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ConfigError(name, problem)
    return value


def default_token_url(universe_domain: str) -> str:
    return f"https://sts.{universe_domain}/v1/token"


def email_from_impersonation_url(url: str) -> str:
    match = _IMPERSONATION_URL.search(urlsplit(url).path)
    if not match:
        raise ConfigError(
            "service_account_impersonation_url",
            "must end in /serviceAccounts/EMAIL:generateAccessToken",
        )
    return match.group(1)


def _string(info: dict[str, Any], key: str, *, required: bool = False, prefix: str = "") -> str:
    value = info.get(key)
    if value is None or value == "":
        if required:
            raise ConfigError(prefix + key, "is required")
        return ""
    if not isinstance(value, str):
        raise ConfigError(prefix + key, "must be a string")
    return value


def _format(source: dict[str, Any]) -> TokenFormat:
    fmt = source.get("format")
    if fmt is None:
        return TokenFormat()
    if not isinstance(fmt, dict):
        raise ConfigError("credential_source.format", "must be an object")
    kind = _string(fmt, "type", prefix="credential_source.format.") or "text"
    if kind not in ("text", "json"):
        raise ConfigError("credential_source.format.type", f"{kind!r} is not 'text' or 'json'")
    field_name = _string(fmt, "subject_token_field_name", prefix="credential_source.format.")
    if kind == "json" and not field_name:
        raise ConfigError("credential_source.format.subject_token_field_name", "is required for json")
    return TokenFormat(kind, field_name)


def _headers(source: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    headers = source.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError("credential_source.headers", "must be an object of string values")
    return tuple(headers.items())


def _x509_refused() -> ConfigError:
    return ConfigError(
        "credential_source.certificate",
        "X.509 certificate (mTLS) workload identity federation is not supported by wif-broker; "
        "use a file, url, aws or azure source",
    )


def parse_source(info: dict[str, Any], token_type: str) -> CredentialSource:
    source = info.get("credential_source")
    if not isinstance(source, dict):
        raise ConfigError("credential_source", "is required and must be an object")
    if "executable" in source:
        raise ConfigError(
            "credential_source.executable",
            "executable-sourced credentials are not supported by wif-broker; use file, url or aws",
        )
    if "certificate" in source:
        raise _x509_refused()
    azure_resource = _string(source, "azure_resource", prefix="credential_source.")
    if azure_resource:
        # wif-broker extension: azure-identity (workload or managed identity) gives the
        # token; a url/file next to it is left for google-auth, which ignores this key.
        if "environment_id" in source or token_type not in JWT_TOKEN_TYPES:
            raise ConfigError(
                "credential_source.azure_resource", "needs a JWT subject_token_type and no environment_id"
            )
        if any(c.isspace() for c in azure_resource):
            raise ConfigError("credential_source.azure_resource", f"{azure_resource!r} is not a URI or GUID")
        return AzureSource(azure_resource)
    if token_type == AWS_TOKEN_TYPE or "environment_id" in source:
        env_id = _string(source, "environment_id", required=True, prefix="credential_source.")
        if env_id != "aws1":
            raise ConfigError("credential_source.environment_id", f"{env_id!r} is not supported (only aws1)")
        if token_type != AWS_TOKEN_TYPE:
            raise ConfigError("subject_token_type", f"must be {AWS_TOKEN_TYPE} for an aws1 source")
        urls = {
            key: _string(source, key, prefix="credential_source.")
            for key in ("regional_cred_verification_url", "region_url", "url", "imdsv2_session_token_url")
        }
        for key, value in urls.items():
            if value:
                check_url(f"credential_source.{key}", value.replace("{region}", "region"))
        return AwsSource(
            regional_cred_verification_url=urls["regional_cred_verification_url"]
            or "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
            region_url=urls["region_url"],
            url=urls["url"],
            imdsv2_session_token_url=urls["imdsv2_session_token_url"],
        )
    present = [key for key in ("file", "url") if source.get(key)]
    if len(present) != 1:
        raise ConfigError("credential_source", "needs exactly one of file, url, environment_id")
    if present == ["file"]:
        return FileSource(_string(source, "file", prefix="credential_source."), _format(source))
    url = check_url("credential_source.url", _string(source, "url", prefix="credential_source."))
    return UrlSource(url, _headers(source), _format(source))


def parse(info: dict[str, Any]) -> CredentialConfig:
    """Validate an ``external_account`` object; raise ConfigError naming the field."""
    kind = _string(info, "type", required=True)
    if kind != "external_account":
        raise ConfigError("type", f"{kind!r} is not 'external_account'")
    audience = _string(info, "audience", required=True)
    project = re.search(r"^//iam\.googleapis\.com/projects/([^/]+)/", audience)
    if project and not project.group(1).isdigit():
        raise ConfigError(
            "audience",
            f"names project {project.group(1)!r}; provider audiences use the project NUMBER: "
            f"gcloud projects describe {project.group(1)} --format='value(projectNumber)'",
        )
    if _WORKFORCE_AUDIENCE.match(audience):
        raise ConfigError("audience", "workforce pools federate people, not workloads; use a workload pool")
    if info.get("workforce_pool_user_project"):
        raise ConfigError("workforce_pool_user_project", "is only valid for workforce pools, not workloads")
    for key in ("client_id", "client_secret"):
        if info.get(key):
            raise ConfigError(key, "is a workforce/gcloud-only field, not valid for a workload pool")
    source = info.get("credential_source")
    if isinstance(source, dict) and "certificate" in source:
        # Before the token type: gcloud's X.509 file says urn:ietf:params:oauth:token-type:mtls,
        # and "not a known subject token type" would hide what is unsupported.
        raise _x509_refused()
    token_type = _string(info, "subject_token_type", required=True)
    if token_type == SAML_TOKEN_TYPE:
        raise ConfigError("subject_token_type", "SAML assertions are not supported by wif-broker")
    if token_type not in (*JWT_TOKEN_TYPES, AWS_TOKEN_TYPE):
        raise ConfigError("subject_token_type", f"{token_type!r} is not a known subject token type")
    universe = _string(info, "universe_domain") or "googleapis.com"
    token_url = check_url("token_url", _string(info, "token_url") or default_token_url(universe))
    imp_url = _string(info, "service_account_impersonation_url")
    email = ""
    if imp_url:
        check_url("service_account_impersonation_url", imp_url)
        email = email_from_impersonation_url(imp_url)
    lifetime = 3600
    imp = info.get("service_account_impersonation")
    if imp is not None:
        if not isinstance(imp, dict):
            raise ConfigError("service_account_impersonation", "must be an object")
        raw = imp.get("token_lifetime_seconds", 3600)
        if not isinstance(raw, int) or isinstance(raw, bool) or not 600 <= raw <= 43200:
            raise ConfigError(
                "service_account_impersonation.token_lifetime_seconds", "must be an integer from 600 to 43200"
            )
        lifetime = raw
    return CredentialConfig(
        audience=audience,
        subject_token_type=token_type,
        token_url=token_url,
        source=parse_source(info, token_type),
        impersonation_url=imp_url,
        service_account_email=email,
        token_lifetime_seconds=lifetime,
        quota_project_id=_string(info, "quota_project_id"),
        universe_domain=universe,
    )

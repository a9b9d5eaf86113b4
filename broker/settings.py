"""Settings: one table, one precedence rule (flag > WIF_BROKER_* env > TOML > default).

Everything is validated here, once, at start-up. A problem raises
:class:`~broker.errors.ConfigError` naming the setting (or the JSON field of the
credential file), which the CLI prints as one line before exiting 2.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker import credconfig, fileless
from broker.credconfig import CredentialConfig
from broker.errors import ConfigError
from broker.tokens import CLOUD_PLATFORM, ScopeSet

ENV_PREFIX = "WIF_BROKER_"
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_SA_PROJECT = re.compile(r"^[^@]+@([a-z][a-z0-9-]{4,28}[a-z0-9])\.iam\.gserviceaccount\.com$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    kind: str  # "str" | "int" | "list"
    default: str | int | tuple[str, ...] | None
    help: str


SPECS: tuple[Spec, ...] = (
    Spec("credentials", "str", None, "external_account JSON file (default $GOOGLE_APPLICATION_CREDENTIALS)"),
    Spec("audience", "str", None, "file-less mode: the workload identity provider audience"),
    Spec("service-account", "str", None, "file-less mode: service account to impersonate"),
    Spec("source", "str", "auto", "file-less mode: auto | aws | azure | file:PATH | url:URL"),
    Spec("token-url", "str", None, "override the STS token endpoint (full URL)"),
    Spec("iam-endpoint", "str", None, "override the IAM Credentials base URL"),
    Spec("aws-credentials", "str", "chain", "chain (botocore: env, IRSA, ECS/Pod Identity, IMDS) | strict"),
    Spec("azure-resource", "str", None, "Entra application ID URI for source = azure"),
    Spec("listen", "list", ("127.0.0.1:8988",), "metadata server address (repeatable)"),
    # Loopback by default like listen (SPEC §2, §8); manifests that need kubelet
    # probes or scraping set 0.0.0.0:8989 explicitly.
    Spec("admin-listen", "str", "127.0.0.1:8989", "address of /healthz, /readyz, /metrics"),
    Spec("imds-passthrough", "str", None, "transparent mode: forward non-GCE paths to this IMDS base URL"),
    Spec("project-id", "str", None, "project/project-id (default: from the service account email)"),
    Spec("numeric-project-id", "str", None, "project/numeric-project-id (default: from the audience)"),
    Spec("zone", "str", None, "instance/zone short name, e.g. us-central1-a"),
    Spec("scopes", "list", (CLOUD_PLATFORM,), "scopes when a client names none"),
    Spec("refresh-before", "int", 600, "seconds before expiry to start renewing"),
    Spec("min-serve-ttl", "int", 300, "never serve a token with fewer seconds left"),
    Spec("log-level", "str", "info", "debug | info | warning | error"),
    Spec("log-format", "str", "json", "json | text"),
    Spec("max-audiences", "int", 256, "ID-token audiences cached at most (least recently used evicted)"),
    Spec("max-scope-sets", "int", 64, "access-token scope sets cached at most (least recently used evicted)"),
    Spec("upstream-rate", "int", 20, "cache misses per second allowed to call IAM (burst: twice this)"),
    Spec("log-level-third-party", "str", "info", "botocore, urllib3, msal, azure: debug | info | ..."),
)
NAMES = {spec.name for spec in SPECS}


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    cred: CredentialConfig
    service_account_email: str  # "" for direct federated access
    access_token_url: str  # generateAccessToken URL, "" without impersonation
    id_token_url: str
    listen: tuple[Address, ...]
    admin_listen: Address
    project_id: str
    numeric_project_id: str
    zone: str
    scopes: ScopeSet
    refresh_before: int
    min_serve_ttl: int
    log_level: str
    log_format: str
    aws_strict: bool
    instance_name: str
    instance_id: str
    imds_passthrough: str = ""  # base URL of the host cloud's IMDS; "" = refuse non-GCE paths
    max_audiences: int = 256
    max_scope_sets: int = 64
    upstream_rate: int = 20  # per second; the bucket holds twice this
    log_level_third_party: str = "info"

    @property
    def impersonating(self) -> bool:
        return bool(self.access_token_url)

    @property
    def email(self) -> str:
        """What the metadata server reports as the account.

        Without impersonation there is no service account; like GKE for a
        Kubernetes service account without a Google service account, the broker
        reports the workload pool identity ``PROJECT.svc.id.goog``.
        """
        return self.service_account_email or f"{self.project_id}.svc.id.goog"


def parse_address(name: str, value: str) -> Address:
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    # ASCII digits (int() rejects "²"); a bad host is refused now, not by a half-started listener.
    if not (sep and port.isascii() and port.isdigit() and int(port) <= 65535 and _host_ok(host, bracketed)):
        raise ConfigError(name, f"{value!r} is not HOST:PORT (an IPv6 host in brackets: [::1]:8988)")
    return Address(host, int(port))


def _host_ok(host: str, bracketed: bool) -> bool:
    try:
        return (ipaddress.ip_address(host).version == 6) == bracketed
    except ValueError:  # a name, then: not "999.1.1.1", not "bad host"
        return not bracketed and bool(_HOSTNAME.match(host)) and not host.replace(".", "").isdigit()


def check_logging(level: str, fmt: str) -> None:
    """Validate the two log settings (``demo`` sets up logging before it builds settings)."""
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log-level", f"{level!r} is not debug, info, warning or error")
    if fmt not in ("json", "text"):
        raise ConfigError("log-format", f"{fmt!r} is not json or text")


def _coerce(spec: Spec, raw: Any, origin: str) -> str | int | tuple[str, ...]:
    if spec.kind == "int":
        text = str(raw).strip()
        text = text[:-1] if text.endswith("s") else text
        if isinstance(raw, bool) or not (text.isascii() and text.isdigit()):
            raise ConfigError(spec.name, f"{raw!r} ({origin}) is not a whole number of seconds")
        if len(text) > 9:  # 4,000 digits parse, then overflow float arithmetic at run time
            raise ConfigError(spec.name, f"({origin}) is out of range (at most 9 digits)")
        return int(text)
    if spec.kind == "list":
        if isinstance(raw, list) and not all(isinstance(item, str) for item in raw):
            # TOML "scopes = [1, {a = 1}]": str() would turn them into scopes.
            raise ConfigError(spec.name, f"({origin}) must be a list of strings")
        items = raw if isinstance(raw, list) else str(raw).split(",")
        values = tuple(str(item).strip() for item in items if str(item).strip())
        if not values:
            raise ConfigError(spec.name, f"({origin}) must not be empty")
        return values
    if not isinstance(raw, str):
        raise ConfigError(spec.name, f"({origin}) must be a string")
    return raw


def _read_toml(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config", f"file {path!r} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{path!r} is not UTF-8 (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path!r} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError("config", f"{path!r} is nested too deeply to be a settings file") from None
    except ValueError:
        # tomllib's int() refuses more than sys.get_int_max_str_digits() digits.
        raise ConfigError("config", f"{path!r} holds a number out of range") from None


def collect(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    specs: tuple[Spec, ...] = SPECS,
    label: str = "setting",
) -> dict[str, Any]:
    """Merge the four layers into raw-but-typed values, rejecting unknown names.

    ``specs``/``label``: another command's table (the webhook's), same rules."""
    names = {spec.name for spec in specs}
    for key in environ:
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower().replace("_", "-")
            if name not in names and name != "config":
                raise ConfigError(key, f"unknown {label}")
    config_path = flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    toml: dict[str, Any] = {}
    for key, value in (_read_toml(config_path) if config_path else {}).items():
        name = key.replace("_", "-")  # TOML may spell names with "_" or "-"
        if name not in names:
            # Named as written, so the operator can find it in the file.
            raise ConfigError(key, f"unknown {label} in {config_path}")
        toml[name] = value
    values: dict[str, Any] = {}
    for spec in specs:
        env_key = ENV_PREFIX + spec.name.upper().replace("-", "_")
        flag = flags.get(spec.name.replace("-", "_"))
        if flag is not None and flag != []:
            values[spec.name] = _coerce(spec, flag, "flag")
        elif environ.get(env_key):
            values[spec.name] = _coerce(spec, environ[env_key], env_key)
        elif spec.name in toml:
            values[spec.name] = _coerce(spec, toml[spec.name], "config file")
        else:
            values[spec.name] = spec.default
    return values


def _impersonation(values: dict[str, Any], cred: CredentialConfig) -> tuple[str, str, str]:
    endpoint = values["iam-endpoint"]
    # Checked even without impersonation: a malformed setting is an error even where unused.
    base = credconfig.check_url("iam-endpoint", endpoint).rstrip("/") if endpoint else ""
    email = values["service-account"] or cred.service_account_email
    if values["service-account"] and cred.service_account_email and email != cred.service_account_email:
        raise ConfigError("service-account", "differs from the credential file's impersonation URL")
    if not email:
        return "", "", ""
    if "@" not in email:
        raise ConfigError("service-account", f"{email!r} is not a service account email")
    if base:
        access = f"{base}/v1/projects/-/serviceAccounts/{email}:generateAccessToken"
    else:
        access = cred.impersonation_url or (
            f"https://iamcredentials.{cred.universe_domain}/v1/projects/-/serviceAccounts/{email}:generateAccessToken"
        )
    return email, access, access.removesuffix(":generateAccessToken") + ":generateIdToken"


def build(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve every setting; raise ConfigError on the first problem."""
    env = os.environ if environ is None else environ
    values = collect(flags, env)
    cred = fileless.credential_config(values, env)
    if values["token-url"]:
        cred = replace(cred, token_url=credconfig.check_url("token-url", values["token-url"]))
    email, access_url, id_url = _impersonation(values, cred)
    project_id = values["project-id"] or _project_from_email(email)
    if not project_id:
        raise ConfigError("project-id", "is required: it cannot be derived from the service account email")
    numeric = values["numeric-project-id"] or cred.project_number
    if not numeric.isdigit():
        raise ConfigError("numeric-project-id", "is required and must be digits (not found in the audience)")
    zone = values["zone"] or ""
    if zone and not _ZONE.match(zone):
        raise ConfigError("zone", f"{zone!r} is not a zone name such as us-central1-a")
    refresh_before, min_ttl = values["refresh-before"], values["min-serve-ttl"]
    if refresh_before <= min_ttl:
        raise ConfigError("refresh-before", f"must be greater than min-serve-ttl ({min_ttl})")
    check_logging(values["log-level"], values["log-format"])
    third_party = values["log-level-third-party"]
    if third_party not in ("debug", "info", "warning", "error"):
        raise ConfigError("log-level-third-party", f"{third_party!r} is not debug, info, warning or error")
    for name in ("max-audiences", "max-scope-sets", "upstream-rate"):
        if not 1 <= values[name] <= 1_000_000:
            raise ConfigError(name, f"{values[name]} is not between 1 and 1000000")
    if values["aws-credentials"] not in ("chain", "strict"):
        raise ConfigError("aws-credentials", f"{values['aws-credentials']!r} is not chain or strict")
    listen = tuple(parse_address("listen", item) for item in values["listen"])
    host = socket.gethostname()
    return Settings(
        cred=cred,
        service_account_email=email,
        access_token_url=access_url,
        id_token_url=id_url,
        listen=listen,
        admin_listen=parse_address("admin-listen", values["admin-listen"]),
        project_id=project_id,
        numeric_project_id=numeric,
        zone=zone,
        scopes=ScopeSet.of(values["scopes"]),
        refresh_before=refresh_before,
        min_serve_ttl=min_ttl,
        log_level=values["log-level"],
        log_format=values["log-format"],
        aws_strict=values["aws-credentials"] == "strict",
        instance_name=host,
        # A stable 19-digit id: clients only require digits (Go InstanceID, .NET).
        instance_id=str(int(hashlib.sha256(host.encode()).hexdigest()[:15], 16) % 10**19).rjust(19, "1"),
        imds_passthrough=_passthrough(values["imds-passthrough"] or "", listen),
        max_audiences=values["max-audiences"],
        max_scope_sets=values["max-scope-sets"],
        upstream_rate=values["upstream-rate"],
        log_level_third_party=values["log-level-third-party"],
    )


def _passthrough(value: str, listen: tuple[Address, ...]) -> str:
    """The pass-through upstream as ``scheme://host[:port]``; "" when off."""
    if not value:
        return ""
    parts = urlsplit(credconfig.check_url("imds-passthrough", value))
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError("imds-passthrough", f"{value!r} must be a base URL such as http://169.254.169.254")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if any(a.port == port and a.host == parts.hostname for a in listen):
        raise ConfigError(
            "imds-passthrough",
            f"{value!r} is the broker's own listen address (a loop): with the address on lo the real "
            "IMDS is unreachable from the pod; use the iptables variant (docs/transparent-mode.md)",
        )
    return f"{parts.scheme}://{parts.netloc}"


def _project_from_email(email: str) -> str:
    match = _SA_PROJECT.match(email)
    return match.group(1) if match else ""

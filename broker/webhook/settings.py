"""Webhook settings: their own table, the same precedence as the sidecar's (SPEC §2, §9).

flag > ``WIF_BROKER_<NAME>`` > TOML (``--config``) > default. A problem raises
:class:`~broker.errors.ConfigError` naming the setting; the CLI prints one line and
exits 2. The sidecar flags the webhook injects are validated here too, by the
sidecar's own settings code (:func:`check_sidecar`), so a webhook that starts never
injects a sidecar that cannot.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker import credconfig
from broker import settings as sidecar_settings
from broker.errors import ConfigError
from broker.settings import Address, Spec, check_logging, parse_address

# An OCI reference: [registry/]path[:tag][@digest]; no spaces, nothing a shell would split.
JWT = "urn:ietf:params:oauth:token-type:jwt"
# A project ID, optionally domain-scoped ("example.com:my-project").
PROJECT_ID = re.compile(r"^(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*(?::[A-Za-z0-9_.-]+)?(?:@sha256:[a-f0-9]{64})?$")

SPECS: tuple[Spec, ...] = (
    Spec("webhook-listen", "str", "0.0.0.0:8443", "HTTPS address of POST /mutate"),
    Spec("admin-listen", "str", "127.0.0.1:8989", "address of /healthz, /readyz, /metrics"),
    Spec("tls-cert-file", "str", None, "PEM certificate chain (re-read when it changes)"),
    Spec("tls-key-file", "str", None, "PEM private key (re-read when it changes)"),
    Spec("sidecar-image", "str", None, "image of the injected wif-broker sidecar"),
    Spec("audience", "str", None, "default workload identity provider audience (//iam.googleapis.com/...)"),
    Spec("token-audience", "str", None, "audience of the projected token (default: https: + audience)"),
    Spec("project-id", "str", None, "default project for direct federated access"),
    Spec("sidecar-args", "str", "", "extra sidecar arguments, one shell-like string"),
    Spec(
        "shutdown-delay",
        "int",
        5,
        "seconds /mutate keeps answering after SIGTERM while /readyz says 503 (endpoint removal)",
    ),
    Spec("log-level", "str", "info", "debug | info | warning | error"),
    Spec("log-format", "str", "json", "json | text"),
)


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    webhook_listen: Address
    admin_listen: Address
    tls_cert_file: str
    tls_key_file: str
    sidecar_image: str
    audience: str  # "" when every ServiceAccount must name its own
    token_audience: str  # "" when derived per pod from the audience in effect
    project_id: str
    sidecar_args: tuple[str, ...]
    shutdown_delay: int  # seconds
    log_level: str
    log_format: str


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file")
    for spec in SPECS:
        parser.add_argument(f"--{spec.name}", dest=spec.name.replace("-", "_"), help=spec.help)


def default_token_audience(audience: str) -> str:
    """The projected token's audience: the provider with ``https:`` for the leading ``//``,
    the default allowed audience of a workload identity pool provider."""
    return "https:" + audience if audience.startswith("//") else audience


@functools.lru_cache(maxsize=64)  # per admission; a cluster has a handful of providers
def audience_problem(audience: str) -> str:
    """What the sidecar's own credential checks say about a provider ``audience`` ("" = fine)."""
    info = {"type": "external_account", "audience": audience, "subject_token_type": JWT}
    try:
        cred = credconfig.parse({**info, "credential_source": {"file": "-"}})
    except ConfigError as exc:
        return exc.problem
    if not audience.startswith("//"):
        return "a provider audience starts with //"
    if not cred.project_number.isdigit():
        return "names no projects/NUMBER/ (the sidecar needs the project number)"
    return ""


def check_sidecar(args: list[str]) -> None:
    """Resolve ``args`` with the sidecar's own parser and settings; raise ConfigError
    (naming the sidecar setting) when the sidecar would refuse them at start-up."""
    from broker import cli  # the sidecar's CLI, imported late: it imports this package lazily

    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            flags = vars(cli.build_parser().parse_args(args))
    except SystemExit:  # argparse's one line, e.g. "unrecognized arguments: --bogus"
        raise ConfigError("sidecar-args", refused.getvalue().strip().removeprefix("wif-broker: ")) from None
    sidecar_settings.build(flags, environ={})


def build(flags: Mapping[str, Any], environ: Mapping[str, str]) -> WebhookSettings:
    """Resolve every webhook setting; raise ConfigError on the first problem."""
    values = sidecar_settings.collect(flags, environ, SPECS, "webhook setting")
    for name in ("tls-cert-file", "tls-key-file", "sidecar-image"):
        if not values[name]:
            raise ConfigError(name, "is required")
    image = values["sidecar-image"]
    if not _IMAGE.match(image):
        raise ConfigError("sidecar-image", f"{image!r} is not an image reference such as repo/name:tag")
    try:
        extra = tuple(shlex.split(values["sidecar-args"]))
    except ValueError as exc:
        raise ConfigError("sidecar-args", f"cannot be split like a shell line: {exc}") from None
    audience, token_audience = values["audience"] or "", values["token-audience"] or ""
    if token_audience and not token_audience.strip() == token_audience:
        raise ConfigError("token-audience", "must not have surrounding spaces")
    if values["shutdown-delay"] > 60:
        raise ConfigError("shutdown-delay", "is at most 60 seconds")
    if values["project-id"] and not PROJECT_ID.match(values["project-id"]):
        raise ConfigError("project-id", f"{values['project-id']!r} is not a project ID such as my-project")
    if audience and audience_problem(audience):
        raise ConfigError("audience", f"{audience!r}: {audience_problem(audience)}")
    check_logging(values["log-level"], values["log-format"])
    resolved = WebhookSettings(
        webhook_listen=parse_address("webhook-listen", values["webhook-listen"]),
        admin_listen=parse_address("admin-listen", values["admin-listen"]),
        tls_cert_file=values["tls-cert-file"],
        tls_key_file=values["tls-key-file"],
        sidecar_image=image,
        audience=audience,
        token_audience=token_audience,
        project_id=values["project-id"] or "",
        sidecar_args=extra,
        shutdown_delay=values["shutdown-delay"],
        log_level=values["log-level"],
        log_format=values["log-format"],
    )
    _check_defaults(resolved)
    return resolved


def _check_defaults(resolved: WebhookSettings) -> None:
    """Dry-run the sidecar the defaults would inject, so a typo in ``audience`` or
    ``sidecar-args`` stops the webhook now instead of every pod later."""
    args = ["run", "--source", "file:/dev/null", "--service-account", "x@p-example.iam.gserviceaccount.com"]
    if resolved.audience:
        args += ["--audience", resolved.audience]
    else:  # a well-formed stand-in, so sidecar-args are still checked
        args += [
            "--audience",
            "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/p",
        ]
    try:
        check_sidecar([*args, *resolved.sidecar_args])
    except ConfigError as exc:
        raise ConfigError("sidecar-args", f"the injected sidecar would refuse them ({exc})") from None

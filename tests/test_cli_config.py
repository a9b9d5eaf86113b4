"""Configuration through the real CLI entry point (SPEC §2).

Every bad input exits 2 with exactly one stderr line naming the setting or JSON
field. Most cases call ``broker.cli.main`` in-process; a few run ``python -m
broker`` to prove the real process exit code and stderr. Also: precedence
flag > env > TOML > default, and ``wif-broker env``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker import cli, daemon, settings
from broker.tokens import CLOUD_PLATFORM, ScopeSet

AUDIENCE = (
    "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/pool/providers/prov"
)
SA = "sa@my-project.iam.gserviceaccount.com"
IMPERSONATION_URL = (
    f"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"
)
ENV_KEYS = (
    "GCE_METADATA_HOST",
    "GCE_METADATA_IP",
    "GCE_METADATA_ROOT",
    "METADATA_EMULATOR_HOST",
    "NO_PROXY",
    "no_proxy",
)


def cred_info(**overrides: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": "external_account",
        "audience": AUDIENCE,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "service_account_impersonation_url": IMPERSONATION_URL,
        "credential_source": {"file": "/var/run/service-account/token", "format": {"type": "text"}},
    }
    for key, value in overrides.items():
        if value is None:
            info.pop(key, None)
        else:
            info[key] = value
    return info


@pytest.fixture
def write_cred(tmp_path: Path) -> Callable[..., str]:
    """Write a credential file (valid unless overridden); ``text=`` writes raw content."""

    def write(text: str | None = None, **overrides: Any) -> str:
        path = tmp_path / "credentials.json"
        path.write_text(json.dumps(cred_info(**overrides)) if text is None else text)
        return str(path)

    return write


@pytest.fixture
def cred(write_cred: Callable[..., str]) -> str:
    return write_cred()


@pytest.fixture
def write_toml(tmp_path: Path) -> Callable[[str], str]:
    def write(text: str) -> str:
        path = tmp_path / "broker.toml"
        path.write_text(text)
        return str(path)

    return write


@pytest.fixture(autouse=True)
def _never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Safety net: a case that wrongly validates must fail, not start a daemon and hang."""

    async def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("configuration was accepted; the daemon would have started")

    monkeypatch.setattr(daemon, "serve", refuse)


def run_main(argv: list[str]) -> int:
    """``cli.main`` as the console script runs it: argparse errors raise SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def one_error_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err.endswith("\n")
    assert out == ""
    assert lines[0].startswith("wif-broker: ")
    return lines[0]


# --- every bad input: exit 2, one line naming the field ----------------------------------------


@dataclass(frozen=True)
class Case:
    argv: list[str]  # "{cred}" / "{toml}" are replaced by the file paths
    field: str  # must appear in the one stderr line
    cred: dict[str, Any] | str | None = None  # overrides for the file, or its raw text
    env: dict[str, str] = field(default_factory=dict)
    toml: str = ""


def bad_listen(value: str, name: str = "--listen") -> Case:
    return Case(["--credentials", "{cred}", name, value], name.removeprefix("--"))


CASES: dict[str, Case] = {
    "missing-credentials-file": Case(["--credentials", "/nonexistent/creds.json"], "credentials"),
    "missing-gac-file": Case(
        [], "credentials", env={"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/c.json"}
    ),
    "no-credentials-at-all": Case([], "credentials"),
    "credentials-is-a-directory": Case(["--credentials", "/"], "credentials"),
    "invalid-json": Case(["--credentials", "{cred}"], "credentials", cred='{"type": "external_account",'),
    "json-not-an-object": Case(["--credentials", "{cred}"], "credentials", cred='["external_account"]'),
    "wrong-type": Case(["--credentials", "{cred}"], "type", cred={"type": "service_account"}),
    "missing-audience": Case(["--credentials", "{cred}"], "audience", cred={"audience": None}),
    "missing-subject-token-type": Case(
        ["--credentials", "{cred}"], "subject_token_type", cred={"subject_token_type": None}
    ),
    "missing-credential-source": Case(
        ["--credentials", "{cred}"], "credential_source", cred={"credential_source": None}
    ),
    "bad-token-url-in-file": Case(
        ["--credentials", "{cred}"], "token_url", cred={"token_url": "sts/v1/token"}
    ),
    "bad-impersonation-url-in-file": Case(
        ["--credentials", "{cred}"],
        "service_account_impersonation_url",
        cred={"service_account_impersonation_url": "iamcredentials.googleapis.com/v1/x"},
    ),
    "bad-credential-source-url": Case(
        ["--credentials", "{cred}"],
        "credential_source.url",
        cred={"credential_source": {"url": "http://[169.254.169.254/token"}},
    ),
    "bad-token-url-flag": Case(["--credentials", "{cred}", "--token-url", "not a url"], "token-url"),
    "bad-token-url-flag-port": Case(
        ["--credentials", "{cred}", "--token-url", "http://sts:99999/x"], "token-url"
    ),
    "bad-token-url-env": Case(
        ["--credentials", "{cred}"], "token-url", env={"WIF_BROKER_TOKEN_URL": "ftp://x/y"}
    ),
    "bad-iam-endpoint": Case(["--credentials", "{cred}", "--iam-endpoint", "iamcredentials"], "iam-endpoint"),
    "bad-iam-endpoint-without-impersonation": Case(
        ["--credentials", "{cred}", "--project-id", "my-project", "--iam-endpoint", "http://[::1"],
        "iam-endpoint",
        cred={"service_account_impersonation_url": None},
    ),
    "unknown-toml-setting": Case(
        ["--credentials", "{cred}", "--config", "{toml}"], "listen_port", toml="listen_port = 1\n"
    ),
    "toml-syntax-error": Case(["--credentials", "{cred}", "--config", "{toml}"], "config", toml="zone = \n"),
    "toml-missing": Case(["--credentials", "{cred}", "--config", "/nonexistent/broker.toml"], "config"),
    "toml-wrong-type": Case(
        ["--credentials", "{cred}", "--config", "{toml}"], "refresh-before", toml='refresh_before = "soon"\n'
    ),
    "toml-not-a-string": Case(["--credentials", "{cred}", "--config", "{toml}"], "zone", toml="zone = 5\n"),
    "unknown-env-var": Case(
        ["--credentials", "{cred}"], "WIF_BROKER_LISTEN_PORT", env={"WIF_BROKER_LISTEN_PORT": "1"}
    ),
    "refresh-before-not-a-number": Case(
        ["--credentials", "{cred}", "--refresh-before", "abc"], "refresh-before"
    ),
    "refresh-before-unicode-digit": Case(
        ["--credentials", "{cred}", "--refresh-before", "6²"], "refresh-before"
    ),
    "min-serve-ttl-negative-env": Case(
        ["--credentials", "{cred}"], "min-serve-ttl", env={"WIF_BROKER_MIN_SERVE_TTL": "-5"}
    ),
    "refresh-before-equals-min-serve-ttl": Case(
        ["--credentials", "{cred}", "--refresh-before", "300", "--min-serve-ttl", "300"], "refresh-before"
    ),
    "refresh-before-below-min-serve-ttl-mixed-layers": Case(
        ["--credentials", "{cred}", "--config", "{toml}"],
        "refresh-before",
        env={"WIF_BROKER_REFRESH_BEFORE": "100"},
        toml="min_serve_ttl = 200\n",
    ),
    "listen-no-port": bad_listen("127.0.0.1"),
    "listen-port-not-number": bad_listen("127.0.0.1:http"),
    "listen-port-too-big": bad_listen("127.0.0.1:99999"),
    "listen-empty-host": bad_listen(":8988"),
    "listen-ipv6-unbracketed": bad_listen("::1"),
    "listen-bad-ip": bad_listen("999.1.1.1:8988"),
    "listen-bad-hostname": bad_listen("bad host:8988"),
    "listen-env": Case(
        ["--credentials", "{cred}"], "listen", env={"WIF_BROKER_LISTEN": "127.0.0.1:8988,nope"}
    ),
    "admin-listen": bad_listen("localhost", "--admin-listen"),
    "bad-zone": Case(["--credentials", "{cred}", "--zone", "central"], "zone"),
    "bad-zone-env": Case(["--credentials", "{cred}"], "zone", env={"WIF_BROKER_ZONE": "us-central1"}),
    "bad-log-level": Case(["--credentials", "{cred}", "--log-level", "verbose"], "log-level"),
    "bad-log-format": Case(["--credentials", "{cred}", "--log-format", "xml"], "log-format"),
    "missing-project-id": Case(
        ["--credentials", "{cred}"], "project-id", cred={"service_account_impersonation_url": None}
    ),
    "project-id-not-derivable": Case(
        ["--credentials", "{cred}"],
        "project-id",
        cred={
            "service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/projects/-/"
            "serviceAccounts/123-compute@developer.gserviceaccount.com:generateAccessToken"
        },
    ),
    "bad-numeric-project-id": Case(
        ["--credentials", "{cred}", "--numeric-project-id", "abc"], "numeric-project-id"
    ),
    "unknown-flag": Case(["--credentials", "{cred}", "--bogus"], "--bogus"),
    "flag-missing-value": Case(["--credentials"], "--credentials"),
    "executable-source": Case(
        ["--credentials", "{cred}"],
        "credential_source.executable",
        cred={"credential_source": {"executable": {"command": "/bin/token", "timeout_millis": 5000}}},
    ),
    "certificate-source": Case(
        ["--credentials", "{cred}"],
        "credential_source.certificate",
        cred={"credential_source": {"certificate": {"use_default_certificate_config": True}}},
    ),
    "bad-token-lifetime-seconds": Case(
        ["--credentials", "{cred}"],
        "token_lifetime_seconds",
        cred={"service_account_impersonation": {"token_lifetime_seconds": "1h"}},
    ),
    "token-lifetime-too-long": Case(
        ["--credentials", "{cred}"],
        "token_lifetime_seconds",
        cred={"service_account_impersonation": {"token_lifetime_seconds": 86400}},
    ),
    "workforce-audience": Case(
        ["--credentials", "{cred}"],
        "audience",
        cred={"audience": "//iam.googleapis.com/locations/global/workforcePools/p/providers/x"},
    ),
    "workforce-user-project": Case(
        ["--credentials", "{cred}"], "workforce_pool_user_project", cred={"workforce_pool_user_project": "1"}
    ),
    "client-id": Case(["--credentials", "{cred}"], "client_id", cred={"client_id": "abc"}),
    "file-and-audience": Case(["--credentials", "{cred}", "--audience", AUDIENCE], "credentials"),
    "fileless-bad-source": Case(["--audience", AUDIENCE, "--source", "gcp"], "source"),
    "fileless-bad-source-url": Case(["--audience", AUDIENCE, "--source", "url:nope"], "source"),
    "service-account-mismatch": Case(
        ["--credentials", "{cred}", "--service-account", "other@my-project.iam.gserviceaccount.com"],
        "service-account",
    ),
    "service-account-not-email": Case(
        ["--credentials", "{cred}", "--service-account", "nobody"],
        "service-account",
        cred={"service_account_impersonation_url": None},
    ),
    "check-command": Case(["check", "--credentials", "{cred}", "--zone", "nowhere"], "zone"),
    "run-command": Case(["run", "--credentials", "{cred}", "--refresh-before", "1m"], "refresh-before"),
    "demo-bad-log-level": Case(["demo", "--log-level", "loud"], "log-level"),
    "demo-bad-listen": Case(["demo", "--listen", "localhost"], "listen"),
    "env-bad-format": Case(["env", "--format", "yaml"], "--format"),
    "env-bad-listen": Case(["env", "--listen", "8988"], "listen"),
    "env-unknown-env-var": Case(["env"], "WIF_BROKER_FORMAT", env={"WIF_BROKER_FORMAT": "k8s"}),
    "unknown-command-flag-order": Case(["--zone", "us-central1-a", "nope"], "nope"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_exits_2_with_one_line(
    case: Case,
    write_cred: Callable[..., str],
    write_toml: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    raw = case.cred if isinstance(case.cred, str) else None
    cred_path = write_cred(text=raw, **(case.cred if isinstance(case.cred, dict) else {}))
    toml_path = write_toml(case.toml)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    argv = [arg.replace("{cred}", cred_path).replace("{toml}", toml_path) for arg in case.argv]
    line = one_error_line(capsys, run_main(argv))
    assert case.field in line
    assert "Traceback" not in line


SUBPROCESS_CASES = {
    "missing-credentials-file": (["--credentials", "/nonexistent/creds.json"], {}, "credentials"),
    "unknown-flag": (["run", "--no-such-flag"], {}, "--no-such-flag"),
    "bad-duration-env": (["--credentials", "{cred}"], {"WIF_BROKER_MIN_SERVE_TTL": "-5"}, "min-serve-ttl"),
    "executable-source": (["--credentials", "{exe}"], {}, "credential_source.executable"),
}


@pytest.mark.parametrize(("argv", "env", "name"), list(SUBPROCESS_CASES.values()), ids=list(SUBPROCESS_CASES))
def test_real_process_exits_2_with_one_line(
    tmp_path: Path, cred: str, argv: list[str], env: dict[str, str], name: str
) -> None:
    exe = tmp_path / "exe.json"
    exe.write_text(json.dumps(cred_info(credential_source={"executable": {"command": "/bin/true"}})))
    args = [a.replace("{cred}", cred).replace("{exe}", str(exe)) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "broker", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert name in lines[0]


def test_valid_config_passes_validation(cred: str) -> None:
    # The base of every case above is valid: each case fails for its own reason only.
    resolved = settings.build({"credentials": cred}, environ={})
    assert resolved.service_account_email == SA
    assert resolved.project_id == "my-project"
    assert resolved.numeric_project_id == "123456789012"
    assert resolved.listen == (settings.Address("127.0.0.1", 8988),)
    assert resolved.admin_listen == settings.Address("127.0.0.1", 8989)  # loopback by default (SPEC §2)
    assert resolved.scopes == ScopeSet.of([CLOUD_PLATFORM])
    assert (resolved.refresh_before, resolved.min_serve_ttl) == (600, 300)
    assert (resolved.log_level, resolved.log_format) == ("info", "json")


def test_credentials_from_google_application_credentials(cred: str) -> None:
    resolved = settings.build({}, environ={"GOOGLE_APPLICATION_CREDENTIALS": cred})
    assert resolved.service_account_email == SA


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8988", settings.Address("127.0.0.1", 8988)),
        ("[::1]:8988", settings.Address("::1", 8988)),
        ("localhost:0", settings.Address("localhost", 0)),
        ("169.254.169.254:80", settings.Address("169.254.169.254", 80)),
        ("metadata.google.internal:80", settings.Address("metadata.google.internal", 80)),
    ],
)
def test_good_addresses(value: str, expected: settings.Address) -> None:
    assert settings.parse_address("listen", value) == expected


# --- precedence: flag > env > TOML > default ---------------------------------------------------

LAYERS = ("flag", "env", "toml", "default")


@pytest.mark.parametrize(
    ("higher", "lower"),
    [(h, lo) for i, h in enumerate(LAYERS) for lo in LAYERS[i + 1 :]],
    ids=lambda layer: str(layer),
)
def test_precedence_pair(higher: str, lower: str, cred: str, write_toml: Callable[[str], str]) -> None:
    zones = {"flag": "us-east1-b", "env": "europe-west4-a", "toml": "asia-east1-c", "default": ""}
    ttls = {"flag": 120, "env": 240, "toml": 360, "default": 300}
    flags: dict[str, Any] = {"credentials": cred}
    environ: dict[str, str] = {}
    for layer in (higher, lower):
        if layer == "flag":
            flags.update(zone=zones["flag"], min_serve_ttl=str(ttls["flag"]))
        elif layer == "env":
            environ.update(WIF_BROKER_ZONE=zones["env"], WIF_BROKER_MIN_SERVE_TTL=str(ttls["env"]))
        elif layer == "toml":
            flags["config"] = write_toml(f'zone = "{zones["toml"]}"\nmin_serve_ttl = {ttls["toml"]}\n')
    resolved = settings.build(flags, environ)
    assert resolved.zone == zones[higher]
    assert resolved.min_serve_ttl == ttls[higher]


def test_config_file_from_env(cred: str, write_toml: Callable[[str], str]) -> None:
    path = write_toml('zone = "us-west1-a"\nlog-level = "debug"\n')
    resolved = settings.build({"credentials": cred}, {"WIF_BROKER_CONFIG": path})
    assert (resolved.zone, resolved.log_level) == ("us-west1-a", "debug")


def test_toml_can_hold_every_setting_shape(cred: str, write_toml: Callable[[str], str]) -> None:
    path = write_toml(
        f"credentials = {json.dumps(cred)}\n"
        'listen = ["127.0.0.1:9001", "[::1]:9001"]\n'
        'admin-listen = "127.0.0.1:9002"\n'
        "refresh_before = 900\n"
        'min_serve_ttl = "120s"\n'
        'scopes = ["b", "a"]\n'
        'log_format = "text"\n'
    )
    resolved = settings.build({"config": path}, {})
    assert resolved.listen == (settings.Address("127.0.0.1", 9001), settings.Address("::1", 9001))
    assert resolved.admin_listen == settings.Address("127.0.0.1", 9002)
    assert (resolved.refresh_before, resolved.min_serve_ttl) == (900, 120)
    assert resolved.scopes == ScopeSet(("a", "b"))
    assert resolved.log_format == "text"


def test_listen_flag_is_repeatable(cred: str) -> None:
    flags = cli.build_parser().parse_args(
        ["run", "--credentials", cred, "--listen", "127.0.0.1:9001", "--listen", "[::1]:9001"]
    )
    resolved = settings.build(vars(flags), {"WIF_BROKER_LISTEN": "127.0.0.1:7000"})
    assert resolved.listen == (settings.Address("127.0.0.1", 9001), settings.Address("::1", 9001))


def test_listen_env_is_comma_separated(cred: str, write_toml: Callable[[str], str]) -> None:
    toml = write_toml('listen = ["127.0.0.1:7000"]\n')
    environ = {"WIF_BROKER_LISTEN": "127.0.0.1:9001, 169.254.169.254:80"}
    resolved = settings.build({"credentials": cred, "config": toml}, environ)
    assert resolved.listen == (settings.Address("127.0.0.1", 9001), settings.Address("169.254.169.254", 80))


def test_listen_toml_list(cred: str, write_toml: Callable[[str], str]) -> None:
    toml = write_toml('listen = ["127.0.0.1:9001", "127.0.0.2:9001"]\n')
    resolved = settings.build({"credentials": cred, "config": toml}, {})
    assert [str(a) for a in resolved.listen] == ["127.0.0.1:9001", "127.0.0.2:9001"]


def test_scopes_are_order_and_duplicate_insensitive(cred: str, write_toml: Callable[[str], str]) -> None:
    a, b = "https://www.googleapis.com/auth/a", "https://www.googleapis.com/auth/b"
    from_flags = settings.build({"credentials": cred, "scopes": [b, a, b]}, {})
    from_env = settings.build({"credentials": cred}, {"WIF_BROKER_SCOPES": f"{a},{b}"})
    from_toml = settings.build({"credentials": cred, "config": write_toml(f'scopes = ["{b}", "{a}"]\n')}, {})
    assert from_flags.scopes == from_env.scopes == from_toml.scopes == ScopeSet((a, b))


def test_empty_env_value_counts_as_unset(cred: str, write_toml: Callable[[str], str]) -> None:
    toml = write_toml('zone = "us-west1-a"\n')
    resolved = settings.build({"credentials": cred, "config": toml}, {"WIF_BROKER_ZONE": ""})
    assert resolved.zone == "us-west1-a"


def test_duration_accepts_seconds_suffix(cred: str) -> None:
    resolved = settings.build({"credentials": cred}, {"WIF_BROKER_REFRESH_BEFORE": "900s"})
    assert resolved.refresh_before == 900


def test_flag_overrides_file_endpoints(cred: str) -> None:
    resolved = settings.build(
        {
            "credentials": cred,
            "token_url": "http://127.0.0.1:1/v1/token",
            "iam_endpoint": "http://127.0.0.1:2/",
        },
        {},
    )
    assert resolved.cred.token_url == "http://127.0.0.1:1/v1/token"
    assert resolved.access_token_url == (
        f"http://127.0.0.1:2/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"
    )
    assert resolved.id_token_url.endswith(f"/serviceAccounts/{SA}:generateIdToken")


# --- wif-broker env ------------------------------------------------------------------------------


def render(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert run_main(["env", *argv]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def parse_sh(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        assert words[0] == "export", line
        key, _, value = words[1].partition("=")
        env[key] = value
    return env


def parse_k8s(text: str) -> dict[str, str]:
    lines = text.splitlines()
    assert lines[0] == "env:"
    env: dict[str, str] = {}
    for name_line, value_line in zip(lines[1::2], lines[2::2], strict=True):
        assert name_line.startswith("- name: ")
        assert value_line.startswith("  value: ")
        env[name_line.removeprefix("- name: ")] = json.loads(value_line.removeprefix("  value: "))
    return env


def parse_ecs(text: str) -> dict[str, str]:
    items = json.loads(text)
    assert all(set(item) == {"name", "value"} for item in items)
    return {item["name"]: item["value"] for item in items}


PARSERS = {"sh": parse_sh, "k8s": parse_k8s, "ecs": parse_ecs}


@pytest.mark.parametrize("fmt", list(PARSERS))
def test_env_bundle_formats(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    env = PARSERS[fmt](render(capsys, "--format", fmt, "--listen", "127.0.0.1:9100"))
    assert tuple(env) == ENV_KEYS
    for key in ENV_KEYS[:4]:
        assert env[key] == "127.0.0.1:9100"
    assert env["NO_PROXY"] == env["no_proxy"]
    assert "127.0.0.1" in env["NO_PROXY"].split(",")
    assert "metadata.google.internal" in env["NO_PROXY"].split(",")


def test_env_default_format_is_sh_with_default_listen(capsys: pytest.CaptureFixture[str]) -> None:
    env = parse_sh(render(capsys))
    assert env["GCE_METADATA_HOST"] == "127.0.0.1:8988"


@pytest.mark.parametrize("wildcard", ["0.0.0.0:8988", "[::]:8988"])
@pytest.mark.parametrize("fmt", list(PARSERS))
def test_env_wildcard_listen_renders_loopback(
    fmt: str, wildcard: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env = PARSERS[fmt](render(capsys, "--format", fmt, "--listen", wildcard))
    assert env["GCE_METADATA_HOST"] == env["GCE_METADATA_ROOT"] == "127.0.0.1:8988"
    assert env["NO_PROXY"].split(",")[0] == "127.0.0.1"


def test_env_ipv6_listen_survives_the_shell(capsys: pytest.CaptureFixture[str]) -> None:
    out = render(capsys, "--listen", "[::1]:8988")
    script = out + 'printf %s "$GCE_METADATA_HOST"'
    shown = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True, timeout=10)
    assert shown.stdout == "[::1]:8988"
    assert parse_sh(out)["NO_PROXY"].startswith("::1,")


def test_env_uses_env_var_and_toml_listen(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], write_toml: Callable[[str], str]
) -> None:
    toml = write_toml('listen = ["127.0.0.1:7000"]\n')
    assert (
        parse_ecs(render(capsys, "--format", "ecs", "--config", toml))["GCE_METADATA_HOST"]
        == "127.0.0.1:7000"
    )
    monkeypatch.setenv("WIF_BROKER_LISTEN", "127.0.0.1:7001")
    assert (
        parse_ecs(render(capsys, "--format", "ecs", "--config", toml))["GCE_METADATA_HOST"]
        == "127.0.0.1:7001"
    )


def test_env_needs_no_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    # The env bundle is rendered at deploy time, where no credential file exists.
    assert parse_k8s(render(capsys, "--format", "k8s"))["GCE_METADATA_IP"] == "127.0.0.1:8988"

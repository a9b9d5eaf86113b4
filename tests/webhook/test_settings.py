"""Webhook settings: flag > WIF_BROKER_* > TOML > default; exit 2 with one line naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker import cli
from broker.errors import ConfigError
from broker.webhook import settings
from tests.webhook import _pods

REQUIRED = {"tls_cert_file": "/c.pem", "tls_key_file": "/k.pem", "sidecar_image": _pods.IMAGE}


def _flags(*argv: str) -> dict[str, object]:
    return vars(cli.build_parser(webhook=True).parse_args(["webhook", *argv]))


def test_defaults() -> None:
    resolved = settings.build({**_flags(), **REQUIRED}, {})
    assert str(resolved.webhook_listen) == "0.0.0.0:8443"
    assert str(resolved.admin_listen) == "127.0.0.1:8989"
    assert resolved.audience == ""
    assert resolved.sidecar_args == ()
    assert resolved.shutdown_delay == 5


def test_precedence_flag_env_toml_default(tmp_path: Path) -> None:
    toml = tmp_path / "webhook.toml"
    toml.write_text('project-id = "from-toml"\nsidecar_args = "--zone us-east1-b"\naudience = "x"\n')
    env = {"WIF_BROKER_AUDIENCE": _pods.AUDIENCE, "WIF_BROKER_PROJECT_ID": "from-env"}
    flags = {**_flags("--config", str(toml), "--project-id", "from-flag"), **REQUIRED}
    resolved = settings.build(flags, env)
    assert resolved.project_id == "from-flag"
    assert resolved.audience == _pods.AUDIENCE, "env beats TOML"
    assert resolved.sidecar_args == ("--zone", "us-east1-b"), "TOML beats the default"
    del flags["project_id"]
    assert settings.build({**flags, "project_id": None}, env).project_id == "from-env"


@pytest.mark.parametrize(
    ("extra", "env", "field"),
    [
        ({"tls_cert_file": None}, {}, "tls-cert-file"),
        ({"sidecar_image": "bad image"}, {}, "sidecar-image"),
        ({"audience": "projects/1/pools/x"}, {}, "audience"),
        ({"audience": "//iam.googleapis.com/projects/my-project/locations/global/x"}, {}, "audience"),
        ({"sidecar_args": "--zone 'open"}, {}, "sidecar-args"),
        ({"sidecar_args": "--no-such-flag 1"}, {}, "sidecar-args"),
        ({"sidecar_args": "--zone Mars"}, {}, "sidecar-args"),
        ({"webhook_listen": "8443"}, {}, "webhook-listen"),
        ({}, {"WIF_BROKER_LISTEN": "127.0.0.1:1"}, "WIF_BROKER_LISTEN"),
        ({"log_level": "loud"}, {}, "log-level"),
        ({"project_id": "123456789012"}, {}, "project-id"),
        ({"shutdown_delay": "61"}, {}, "shutdown-delay"),
    ],
)
def test_bad_settings_name_the_field(extra: dict[str, object], env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings.build({**_flags(), **REQUIRED, **extra}, env)
    assert caught.value.name == field


def test_bad_settings_exit_2_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker", "webhook", "--tls-cert-file", "/nope.pem", "--tls-key-file", "/k"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "sidecar-image" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_certificate_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "webhook",
            f"--tls-cert-file={tmp_path / 'missing.pem'}",
            f"--tls-key-file={tmp_path / 'missing.key'}",
            f"--sidecar-image={_pods.IMAGE}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "none")},
    )
    assert done.returncode == 2
    assert "tls-cert-file" in done.stderr
    assert done.stderr.count("\n") == 1


def test_sidecar_never_imports_the_kubernetes_client() -> None:
    """The sidecar's footprint does not grow: neither `import broker.cli` nor building the
    `run` settings pulls in kubernetes_asyncio or the webhook package."""
    code = (
        "import sys; from broker import cli, settings\n"
        "cli.build_parser().parse_args(['run'])\n"
        "from broker import daemon, admin, metadata\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('kubernetes_asyncio', 'broker.webhook')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_webhook_imports_point_one_way() -> None:
    """inject.py stays pure (no HTTP, no Kubernetes client); only the CLI reaches broker.webhook."""
    from tests.test_architecture import ROOT, imports_of

    inject = imports_of(ROOT / "webhook" / "inject.py")
    assert not [n for n in inject if n.startswith(("aiohttp", "kubernetes_asyncio", "broker.webhook.kube"))]
    for module in ROOT.rglob("*.py"):
        if "webhook" in module.parts or module.name == "cli.py":
            continue
        assert not [n for n in imports_of(module) if n.startswith("broker.webhook")], module
    kube_users = [
        m.name for m in (ROOT / "webhook").glob("*.py") if "kubernetes_asyncio" in str(imports_of(m))
    ]
    assert kube_users == ["kube.py"], "one module owns the Kubernetes client"


def test_unusable_kubeconfig_exits_2_naming_it(tmp_path: Path, webhook_tls: Path) -> None:
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "webhook",
            f"--tls-cert-file={webhook_tls / 'server.pem'}",
            f"--tls-key-file={webhook_tls / 'server.key'}",
            f"--sidecar-image={_pods.IMAGE}",
            "--webhook-listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "KUBECONFIG": str(tmp_path / "kubeconfig")},
    )
    assert done.returncode == 2, done.stderr
    assert "KUBECONFIG" in done.stderr
    assert "Traceback" not in done.stderr

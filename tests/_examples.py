"""Checks shared by the tests of the shipped examples (k8s/, config/aws/, config/azure/).

Each example family has its own test module; what they have in common — that a
credential file is byte-for-byte what ``gcloud … create-cred-config`` writes, that
a systemd unit runs the broker on loopback with its file, that an env file is the
env bundle — lives here once.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from configparser import ConfigParser, SectionProxy
from pathlib import Path
from typing import Any

from broker import cli, credconfig, envbundle, settings
from tests.conftest import require_tool

BUNDLE = envbundle.bundle(settings.Address("127.0.0.1", 8988))


def gcloud_cred_config(tmp_path: Path, info: dict[str, Any], *source_flags: str) -> dict[str, Any]:
    """What real gcloud writes for ``info``'s pool provider and service account, given the
    credential-source flags; the caller compares it with the shipped file."""
    gcloud = require_tool("gcloud")
    out = tmp_path / "credentials.json"
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
    subprocess.run(
        [
            gcloud,
            "iam",
            "workload-identity-pools",
            "create-cred-config",
            info["audience"].removeprefix("//iam.googleapis.com/"),
            "--service-account="
            + credconfig.email_from_impersonation_url(info["service_account_impersonation_url"]),
            *source_flags,
            "--output-file=" + str(out),
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    loaded: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return loaded


def systemd_broker(unit_file: Path, credentials_text: str, tmp_path: Path) -> settings.Settings:
    """The settings the unit's ExecStart resolves to, with ``credentials_text`` standing in
    for its credential file; asserts what every shipped unit promises (the installed
    binary, metadata and admin on loopback, a dynamic user, time to drain on stop)."""
    unit = ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(unit_file.read_text(encoding="utf-8"))
    service: SectionProxy = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == "/opt/wif-broker/bin/wif-broker"
    flags = vars(cli.build_parser().parse_args(argv[1:]))
    assert flags["credentials"] == "/etc/wif-broker/credentials.json"
    copy = tmp_path / "credentials.json"
    copy.write_text(credentials_text, encoding="utf-8")
    resolved = settings.build({**flags, "credentials": str(copy)}, {})
    assert [str(a) for a in resolved.listen] == ["127.0.0.1:8988"]
    assert resolved.admin_listen.host == "127.0.0.1"
    assert service["DynamicUser"] == "yes"
    assert int(service["TimeoutStopSec"]) >= 10
    return resolved


def env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a systemd EnvironmentFile, comments and blank lines skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

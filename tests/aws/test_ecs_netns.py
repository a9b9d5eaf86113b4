"""ECS task role through AWS_CONTAINER_CREDENTIALS_RELATIVE_URI, end to end, in a network namespace.

botocore sends the relative URI to the hard-wired 169.254.170.2. That address
is put on the loopback of a namespace this test creates (never on the host),
and ``netns_ecs_scenario.py`` runs the fakes, the broker and the real clients
inside it. In CI (CI=true) a namespace that cannot be created fails the test;
locally the test is skipped only when not running as root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("netns_ecs_scenario.py")


def _ip() -> str:
    if os.geteuid() != 0 and not IN_CI:
        pytest.skip("creating a network namespace needs root")
    path = shutil.which("ip")
    if path is None:
        pytest.fail("the ip command (iproute2) is required for the ECS relative-URI test")
    return path


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


def test_ecs_relative_uri_in_a_network_namespace() -> None:
    ip = _ip()
    namespace = f"wifb-ecs-{secrets.token_hex(4)}"
    _run(ip, "netns", "add", namespace)
    try:
        _run(ip, "-n", namespace, "link", "set", "lo", "up")
        _run(ip, "-n", namespace, "addr", "add", "169.254.170.2/32", "dev", "lo")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GCE_METADATA", "CLOUDSDK_"))}
        env["WIFB_HOST_NETNS"] = os.readlink("/proc/self/ns/net")  # the script refuses to run here
        done = subprocess.run(
            [ip, "netns", "exec", namespace, sys.executable, str(SCENARIO)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        subprocess.run([ip, "netns", "del", namespace], capture_output=True, timeout=30, check=False)
    listed = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert namespace not in listed, "the namespace was not deleted"
    assert done.returncode == 0, f"scenario failed:\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"scenario printed nothing:\n{done.stderr}"
    result = json.loads(lines[-1])
    assert "error" not in result, result

    assert result["ecs_url"].startswith("http://169.254.170.2:80/v2/credentials/")
    assert result["container_calls"], "botocore never asked the ECS endpoint"
    for call in result["container_calls"]:
        assert call["method"] == "GET"
        assert call["path"].startswith("/v2/credentials/")
        assert call["accept"] == "application/json"
    assert result["method"] == "container-role"
    assert result["subjects"] == [result["expected_subject"]]
    assert result["signing_keys_known"]
    assert result["gcloud_ok"], result["clients"]
    assert result["google_auth_ok"], result["clients"]
    assert result["caller_identity_calls"] == 0

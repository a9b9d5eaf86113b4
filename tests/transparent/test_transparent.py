"""Transparent mode (SPEC §6) end to end, in network namespaces this test creates.

Real clients find the broker with **no GCE variable at all**, the way they do
on GCE: google-auth by pinging 169.254.169.254, gcloud through
metadata.google.internal, Node and Go (tests/clients probes, when their
toolchains are installed) by both. botocore's IMDSv2 credential fetch goes
through the broker's IMDS pass-through to a fake AWS IMDS. Both deployment
variants of docs/transparent-mode.md run:

* ``alias``: 169.254.169.254/32 on ``lo``, the broker listening on it, port 80;
* ``iptables``: the exact rule of ``k8s/transparent/iptables-init.yaml``, the
  broker as a separate process under the manifest's UID with the manifest's
  settings, the fake IMDS owning 169.254.169.254:80 as the real one does.

``ip netns exec`` bind-mounts ``/etc/netns/NS/hosts`` over ``/etc/hosts`` for
the scenario, which maps metadata.google.internal like the pod's hostAliases.
Nothing here connects to 169.254.169.254 from the host namespace: only
``netns_scenario.py`` does, and it refuses to run there. The namespace and the
hosts file are always removed. In CI (CI=true) a namespace (or iptables) that
cannot be set up fails the test; locally it is skipped when not root.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import site
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients._toolchains import build_go_probe, require_node_modules
from tests.conftest import IN_CI, PROJECT, require_tool
from tests.transparent._manifests import broker_container, iptables_rule, pod

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).with_name("netns_scenario.py")
IMDS = "169.254.169.254"
HOSTS = f"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{IMDS} metadata.google.internal\n"
SCENARIO_SECONDS = 300
pytestmark = pytest.mark.client


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} not available")


def _ip() -> str:
    if os.geteuid() != 0:
        _missing("root (to create a network namespace)")
    path = shutil.which("ip")
    if path is None:
        _missing("the ip command (iproute2)")
    return str(path)


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


@contextlib.contextmanager
def namespace(ip: str, prefix: str) -> Iterator[str]:
    """A fresh namespace: lo up, 169.254.169.254/32 on lo, its own hosts file; always removed."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    netns_etc = Path("/etc/netns")
    created_etc = not netns_etc.exists()
    etc = netns_etc / name
    _run(ip, "netns", "add", name)
    try:
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(HOSTS)
        _run(ip, "-n", name, "link", "set", "lo", "up")
        _run(ip, "-n", name, "addr", "add", f"{IMDS}/32", "dev", "lo")
        yield name
    finally:
        subprocess.run([ip, "netns", "del", name], capture_output=True, timeout=30, check=False)
        shutil.rmtree(etc, ignore_errors=True)
        if created_etc:
            with contextlib.suppress(OSError):
                netns_etc.rmdir()
    listed = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert name not in listed, "the namespace was not deleted"
    assert not etc.exists(), "the namespace's hosts file was not removed"


@pytest.fixture(scope="module")
def optional_clients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """gcloud always; Node and Go when their toolchains are installed. In CI all are required."""
    found: dict[str, Any] = {"gcloud": require_tool("gcloud")}
    with contextlib.suppress(pytest.skip.Exception):
        found["node_dir"] = str(require_node_modules())
        found["node"] = require_tool("node")
    with contextlib.suppress(pytest.skip.Exception):
        found["go_probe"] = str(build_go_probe(tmp_path_factory.mktemp("go-probe")))
    return found


def _scenario(ip: str, name: str, config: dict[str, Any]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GCE_METADATA", "CLOUDSDK_"))}
    env["WIFB_HOST_NETNS"] = os.readlink("/proc/self/ns/net")  # the script refuses to run here
    done = subprocess.run(
        [ip, "netns", "exec", name, sys.executable, str(SCENARIO), json.dumps(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCENARIO_SECONDS,
        check=False,
    )
    assert done.returncode == 0, f"scenario failed:\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"scenario printed nothing:\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert "error" not in result, result
    return result


def _check(result: dict[str, Any], config: dict[str, Any]) -> None:
    clients = result["clients"]
    access, ids = set(result["issued_access"]), set(result["issued_id"])

    def describe(name: str) -> str:
        return str(clients[name]["describe"])

    expected = {"google_auth", "botocore", "gcloud"}
    expected |= {"node"} if "node_dir" in config else set()
    expected |= {"go"} if "go_probe" in config else set()
    assert set(clients) == expected
    for name in clients:
        assert clients[name]["ok"], describe(name)

    python = clients["google_auth"]["out"]
    assert python["compute_engine"] is True, describe("google_auth")
    assert python["project"] == PROJECT, describe("google_auth")
    assert python["token"] in access, describe("google_auth")
    assert python["id_token"] in ids, describe("google_auth")

    assert clients["gcloud"]["out"] in access, describe("gcloud")

    if "node" in clients:
        node = clients["node"]["out"]
        assert node["isAvailable"] is True, describe("node")
        assert node["clientKind"] == "Compute", describe("node")
        assert node["projectId"] == PROJECT, describe("node")
        assert node["accessToken"] in access, describe("node")
        assert node["idToken"] in ids, describe("node")
    if "go" in clients:
        go = clients["go"]["out"]
        assert go["onGCE"] is True, describe("go")
        assert go["projectId"] == PROJECT, describe("go")
        assert go["defaultCredentialsToken"] in access, describe("go")
        assert go["computeToken"] in access, describe("go")
        assert go["idToken"] in ids, describe("go")

    # botocore: IMDSv2 through the pass-through, to the fake AWS IMDS.
    aws = clients["botocore"]["out"]
    assert aws == {"method": "iam-role", "access_key": result["aws_access_key"]}, describe("botocore")
    calls = result["imds_calls"]
    assert calls, "the fake IMDS was never reached"
    assert (calls[0]["method"], calls[0]["path"]) == ("PUT", "/latest/api/token")
    paths = {c["path"] for c in calls}
    assert "/latest/meta-data/iam/security-credentials/" in paths
    assert f"/latest/meta-data/iam/security-credentials/{result['aws_role']}" in paths
    for call in calls:
        assert call["via"] == "1.1 wif-broker", "every IMDS request came through the broker"
        assert not call["xff"]
    assert all(c["token_ok"] for c in calls[1:]), "the IMDSv2 session token was relayed"
    assert result["passthrough_2xx"] >= len(calls)
    assert not result["token_in_broker_log"]


def test_alias_variant_broker_on_169_254_169_254(optional_clients: dict[str, Any]) -> None:
    ip = _ip()
    config = {"mode": "alias", **optional_clients}
    with namespace(ip, "wifb-alias") as name:
        result = _scenario(ip, name, config)
    _check(result, config)


def _broker_python(uid: int, gid: int, pythonpath: str) -> str:
    """An interpreter of this Python version that ``uid`` may run (the venv's may live under /root)."""
    candidates = dict.fromkeys(
        [sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3", "/usr/local/bin/python3"]
    )
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    check = "import sys, aiohttp, botocore, broker.cli; print('%d.%d' % sys.version_info[:2])"
    for candidate in filter(None, candidates):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                [candidate, "-c", check],
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath},
                user=uid,
                group=gid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0 and done.stdout.strip() == want:
                return candidate
    _missing(f"a Python {want} that UID {uid} can run with the test dependencies")
    raise AssertionError("unreachable")


def test_iptables_variant_runs_the_manifest_rule(optional_clients: dict[str, Any]) -> None:
    ip = _ip()
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # root's tools
    iptables = shutil.which("iptables", path=search)
    if iptables is None:
        _missing("iptables")
    manifest = pod("iptables-init.yaml")
    rule = iptables_rule(manifest)
    broker = broker_container(manifest)
    uid, gid = broker["securityContext"]["runAsUser"], broker["securityContext"]["runAsGroup"]
    env = {e["name"]: e["value"] for e in broker["env"] if e["name"] != "WIF_BROKER_CREDENTIALS"}
    listen = env["WIF_BROKER_LISTEN"]
    admin_port = env["WIF_BROKER_ADMIN_LISTEN"].rsplit(":", 1)[1]
    pythonpath = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    config = {
        "mode": "iptables",
        **optional_clients,
        "broker_env": env,
        "broker_uid": uid,
        "broker_gid": gid,
        "broker_python": _broker_python(uid, gid, pythonpath),
        "pythonpath": pythonpath,
        "admin_url": f"http://127.0.0.1:{admin_port}",
    }
    assert listen.startswith("127.0.0.1:"), "the broker stays on loopback in this variant"
    with namespace(ip, "wifb-ipt") as name:
        _run(ip, "netns", "exec", name, iptables, *rule[1:])
        result = _scenario(ip, name, config)
    _check(result, config)
    assert result["broker_exit"] == 0, "the broker drains and exits 0 on SIGTERM"
    assert result["broker_log_lines"] > 0, "the broker logged at debug level (checked for tokens)"

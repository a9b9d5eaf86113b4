"""k8s/transparent/: schema-valid, and the iptables variant keeps its contract.

The contract the netns test relies on and the docs promise: the redirect is
one rule for 169.254.169.254:80 only, exempting exactly the broker's UID (the
image's USER) and landing on the broker's loopback listener; the only root,
NET_ADMIN step is a one-shot init container that runs before the broker; the
broker itself is unprivileged and relays to the real IMDS; apps do not share
the exempt UID; metadata.google.internal resolves to 169.254.169.254.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from broker import settings
from tests.transparent._manifests import (
    ROOT,
    TRANSPARENT,
    broker_container,
    documents,
    iptables_rule,
    pod,
    redirect_container,
)

K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
MANIFESTS = sorted(p.name for p in TRANSPARENT.glob("*.yaml"))
PLACEHOLDERS = {"PROJECT_NUMBER": "123456789012", "PROJECT_ID": "my-project", "POOL": "p", "PROVIDER": "q"}


def image_uid() -> tuple[int, int]:
    (user,) = re.findall(r"(?m)^USER\s+(\d+):(\d+)\s*$", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    return int(user[0]), int(user[1])


def resolved(container: dict[str, Any], tmp_path: Path) -> settings.Settings:
    """The broker container's settings, resolved as the broker would (placeholders filled)."""
    text = (ROOT / "config" / "credentials-k8s-token.json").read_text(encoding="utf-8")
    for key, value in PLACEHOLDERS.items():
        text = text.replace(key, value)
    cred = tmp_path / "credentials.json"
    cred.write_text(text, encoding="utf-8")
    env = {e["name"]: e["value"] for e in container["env"]}
    env["WIF_BROKER_CREDENTIALS"] = str(cred)
    assert container["args"] == ["run"]
    return settings.build({}, env)


def test_both_examples_are_here() -> None:
    assert {"pod-port80.yaml", "iptables-init.yaml"} <= set(MANIFESTS)


@pytest.mark.parametrize("name", MANIFESTS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.usefixtures("no_network")
def test_manifest_validates_against_kubernetes_schema(name: str, version: str) -> None:
    docs = documents(name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_redirect_rule_is_narrow_and_exempts_the_broker(tmp_path: Path) -> None:
    doc = pod("iptables-init.yaml")
    broker = broker_container(doc)
    rule = iptables_rule(doc)
    assert rule[0] == "iptables"
    # Exactly: nat OUTPUT, tcp to 169.254.169.254:80, not from the broker's UID, to its port.
    uid, gid = image_uid()
    own = resolved(broker, tmp_path)
    (listen,) = own.listen
    assert rule[1:] == [
        *("-t", "nat", "-A", "OUTPUT", "-d", "169.254.169.254/32", "-p", "tcp", "--dport", "80"),
        *("-m", "owner", "!", "--uid-owner", str(uid), "-j", "REDIRECT", "--to-ports", str(listen.port)),
    ]
    assert listen.host == "127.0.0.1", "REDIRECT lands on loopback; nothing else needs to listen"
    assert (broker["securityContext"]["runAsUser"], broker["securityContext"]["runAsGroup"]) == (uid, gid)
    assert own.imds_passthrough == "http://169.254.169.254"


def test_only_the_one_shot_init_step_is_privileged() -> None:
    doc = pod("iptables-init.yaml")
    spec = doc["spec"]
    init = redirect_container(doc)
    names = [c["name"] for c in spec["initContainers"]]
    assert names.index(init["name"]) < names.index(broker_container(doc)["name"]), "rule first, then broker"
    assert "restartPolicy" not in init, "a plain init container: runs to completion before the rest"
    sc = init["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert not sc.get("privileged")
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), key
    assert spec["automountServiceAccountToken"] is False
    uid, _ = image_uid()
    for container in [*spec["initContainers"], *spec["containers"]]:
        if container is init:
            continue
        own = container["securityContext"]
        assert own["runAsNonRoot"] is True, container["name"]
        assert own["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert own["allowPrivilegeEscalation"] is False, container["name"]
        assert own["readOnlyRootFilesystem"] is True, container["name"]
        assert own["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
    for app in spec["containers"]:
        assert app["securityContext"]["runAsUser"] not in (0, uid), f"{app['name']} would bypass the redirect"


def test_clients_need_no_env_and_the_name_resolves_to_the_link_local_address() -> None:
    spec = pod("iptables-init.yaml")["spec"]
    aliases = {h: a["ip"] for a in spec["hostAliases"] for h in a["hostnames"]}
    assert aliases == {"metadata.google.internal": "169.254.169.254"}, "Go's DNS probe wants exactly this"
    for app in spec["containers"]:
        names = {e["name"] for e in app.get("env", [])}
        assert not {n for n in names if n.startswith("GCE_METADATA")}, app["name"]
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in names
    assert "sysctls" not in spec.get("securityContext", {}), "no port 80 in this variant"


def test_building_block_points_at_the_full_variant() -> None:
    text = (TRANSPARENT / "pod-port80.yaml").read_text(encoding="utf-8")
    assert "iptables-init.yaml" in text
    assert "docs/transparent-mode.md" in text


def test_docs_quote_the_shipped_rule() -> None:
    doc = (ROOT / "docs" / "transparent-mode.md").read_text(encoding="utf-8")
    assert " ".join(iptables_rule(pod("iptables-init.yaml"))) in doc

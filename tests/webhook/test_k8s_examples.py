"""The hand-written manifests in k8s/ (the no-webhook path) do not drift from the webhook.

For k8s/deployment.yaml and k8s/job.yaml: take the pod template, remove what the
broker adds by hand (sidecar, token and credential volumes, hostAliases, env bundle),
let :func:`broker.webhook.inject.decide` inject it again, and compare. They must agree
on everything but the one documented difference: the manifests configure the sidecar
from a credential-file ConfigMap mounted next to the projected token, the webhook with
file-less flags (the token at /var/run/secrets/wif-broker).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from broker import envbundle, settings
from broker.webhook import inject
from broker.webhook.settings import WebhookSettings
from tests.webhook import _pods

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ("deployment.yaml", "job.yaml")
NUMBER = "123456789012"
SAME_IN_BOTH = (
    "image",
    "restartPolicy",
    "ports",
    "startupProbe",
    "livenessProbe",
    "resources",
    "securityContext",
)


def _pod_template(name: str) -> dict[str, Any]:
    text = (ROOT / "k8s" / name).read_text(encoding="utf-8").replace("PROJECT_NUMBER", NUMBER)
    doc = yaml.safe_load(text)
    template: dict[str, Any] = doc["spec"]["template"]
    return template


def _strip(template: dict[str, Any]) -> dict[str, Any]:
    pod = {"kind": "Pod", "apiVersion": "v1", "metadata": copy.deepcopy(template["metadata"])}
    spec = copy.deepcopy(template["spec"])
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "wif-broker"]
    if not spec["initContainers"]:
        del spec["initContainers"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] not in ("gcp-token", "wif-broker-credentials")]
    del spec["hostAliases"]
    bundle = envbundle.bundle(settings.Address("127.0.0.1", 8988))
    for container in spec["containers"]:
        container["env"] = [e for e in container.get("env", []) if e["name"] not in bundle]
    pod["spec"] = spec
    return pod


def _token_audience(template: dict[str, Any]) -> str:
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "gcp-token"]
    audience: str = volume["projected"]["sources"][0]["serviceAccountToken"]["audience"]
    return audience


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_what_the_webhook_injects(name: str) -> None:
    template = _pod_template(name)
    by_hand = next(c for c in template["spec"]["initContainers"] if c["name"] == "wif-broker")
    audience = "//" + _token_audience(template).removeprefix("https://")
    cfg = WebhookSettings(
        webhook_listen=settings.Address("0.0.0.0", 8443),
        admin_listen=settings.Address("127.0.0.1", 8989),
        tls_cert_file="-",
        tls_key_file="-",
        sidecar_image=by_hand["image"],
        audience=audience,
        token_audience="",
        project_id="",
        sidecar_args=(),
        shutdown_delay=0,
        log_level="info",
        log_format="json",
    )
    stripped = _strip(template)
    decision = inject.decide(stripped, "team-a", "app", {inject.GKE_ANNOTATION: _pods.SA_EMAIL}, cfg)
    assert decision.outcome is inject.Outcome.INJECTED, decision.message
    webhook = jsonpatch.apply_patch(stripped, list(decision.patch))
    injected = webhook["spec"]["initContainers"][0]

    for key in SAME_IN_BOTH:
        assert injected[key] == by_hand[key], f"k8s/{name}: sidecar {key} differs from the webhook's"
    assert webhook["spec"]["hostAliases"] == template["spec"]["hostAliases"]
    for mine, theirs in zip(webhook["spec"]["containers"], template["spec"]["containers"], strict=True):
        assert sorted(mine["env"], key=lambda e: e["name"]) == sorted(theirs["env"], key=lambda e: e["name"])
    (token,) = [v for v in webhook["spec"]["volumes"] if v["name"] == inject.VOLUME]
    (theirs,) = [v for v in template["spec"]["volumes"] if v["name"] == "gcp-token"]
    assert token["projected"] == theirs["projected"], "same audience, path and lifetime"
    # Everything else in the pod is as the manifest wrote it.
    rest = {k: v for k, v in webhook["spec"].items() if k not in ("initContainers", "volumes", "containers")}
    assert rest == {
        k: v for k, v in template["spec"].items() if k not in ("initContainers", "volumes", "containers")
    }

    # The documented difference, and that both resolve to the same listeners.
    by_hand_env = {e["name"]: e["value"] for e in by_hand["env"]}
    assert by_hand_env["WIF_BROKER_LISTEN"] == "127.0.0.1:8988"
    assert by_hand_env["WIF_BROKER_ADMIN_LISTEN"] == "0.0.0.0:8989"
    assert "--listen=127.0.0.1:8988" in injected["args"]
    assert "--admin-listen=0.0.0.0:8989" in injected["args"]
    assert "env" not in injected


def test_injected_pod_in_the_docs_is_what_the_webhook_injects() -> None:
    """docs/deployment.md shows an injected pod spec; it is regenerated, not hand-written."""
    text = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
    block = text.split("What a pod admitted this way gets", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = yaml.safe_load(block)["spec"]
    cfg = WebhookSettings(
        webhook_listen=settings.Address("0.0.0.0", 8443),
        admin_listen=settings.Address("127.0.0.1", 8989),
        tls_cert_file="-",
        tls_key_file="-",
        sidecar_image="registry.example.com/wif-broker:0.1.0",
        audience="//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/k8s-pool/providers/my-cluster",
        token_audience="",
        project_id="",
        sidecar_args=(),
        shutdown_delay=0,
        log_level="info",
        log_format="json",
    )
    pod = {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"generateName": "app-7d9f8b6c5d-", "namespace": "team-a"},
        "spec": {
            "serviceAccountName": "app",
            "containers": [{"name": "app", "image": "registry.example.com/app:1"}],
        },
    }
    email = {inject.GKE_ANNOTATION: "app@my-project.iam.gserviceaccount.com"}
    decision = inject.decide(pod, "team-a", "app", email, cfg)
    assert jsonpatch.apply_patch(pod, list(decision.patch))["spec"] == shown

"""charts/wif-broker: `helm lint` and `helm template` with a real helm binary, every rendered
object validated against the Kubernetes schema (1.29 and latest), the §9 contract checked
on the rendered objects, and the chart-generated certificate served by the real webhook."""

from __future__ import annotations

import base64
import importlib.machinery
import importlib.util
import shutil
import socket
import ssl
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker import cli
from broker.errors import ConfigError
from broker.webhook import settings as webhook_settings
from tests.conftest import IN_CI
from tests.webhook import _pods
from tests.webhook._fakeapi import FakeApiServer
from tests.webhook._process import WebhookProcess

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wif-broker"
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CERT_MANAGER_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}
NAMESPACE = "wif-system"
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "audience": ["--set", f"audience={_pods.AUDIENCE}", "--set", "projectId=my-project"],
    "cert-manager": ["--set", "tls.certManager.enabled=true", "--set", f"audience={_pods.AUDIENCE}"],
    "cert-manager-issuer": [
        "--set",
        "tls.certManager.enabled=true",
        "--set",
        "tls.certManager.issuerRef.name=corp-ca",
        "--set",
        "tls.certManager.issuerRef.kind=ClusterIssuer",
    ],
    "image-string": [
        "--set",
        "sidecar.image=registry.example/wif-broker:0.1.0",
        "--set",
        "sidecar.args=--zone us-east1-b",
    ],
}


def helm() -> str:
    """.tools/bin/helm (scripts/install-helm) or helm on PATH; in CI its absence is a failure."""
    local = ROOT / ".tools" / "bin" / "helm"
    found = str(local) if local.is_file() else shutil.which("helm")
    if found is None:
        message = "helm not found: run scripts/install-helm"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120, check=False)


@cache
def rendered(variant: str) -> tuple[dict[str, Any], ...]:
    done = _run("template", "wif", str(CHART), "--namespace", NAMESPACE, *VARIANTS[variant])
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def _one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint(variant: str) -> None:
    done = _run("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *VARIANTS[variant])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.usefixtures("no_network")
def test_rendered_objects_validate(variant: str, version: str) -> None:
    docs = rendered(variant)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "PodDisruptionBudget", "Service", "ServiceAccount", "ClusterRole"} <= kinds
    assert {"ClusterRoleBinding", "MutatingWebhookConfiguration"} <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CERT_MANAGER_KINDS:
            # A CRD: no schema in kubernetes-validate; the fields cert-manager requires.
            assert doc["metadata"]["namespace"] == NAMESPACE
            assert doc["spec"].get("issuerRef", {}).get("name") or doc["kind"] == "Issuer"
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_chart_is_cert_manager_or_generated_ca() -> None:
    generated = rendered("defaults")
    assert not [d for d in generated if d["apiVersion"].startswith("cert-manager.io")]
    secret = _one(generated, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    mwc = _one(generated, "MutatingWebhookConfiguration")
    assert mwc["webhooks"][0]["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    managed = rendered("cert-manager")
    assert not [d for d in managed if d["kind"] == "Secret"]
    cert = next(d for d in managed if d["kind"] == "Certificate" and not d["spec"].get("isCA"))
    mwc = _one(managed, "MutatingWebhookConfiguration")
    assert "caBundle" not in mwc["webhooks"][0]["clientConfig"]
    ns, name = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    assert (ns, name) == (NAMESPACE, cert["metadata"]["name"])
    deployment = _one(managed, "Deployment")
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["secret"]["secretName"] == cert["spec"]["secretName"]
    issuer_ref = next(d for d in rendered("cert-manager-issuer") if d["kind"] == "Certificate")["spec"][
        "issuerRef"
    ]
    assert issuer_ref == {"name": "corp-ca", "kind": "ClusterIssuer"}


def test_mutating_webhook_configuration_is_the_spec_s() -> None:
    docs = rendered("defaults")
    (hook,) = _one(docs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Fail"
    assert hook["sideEffects"] == "None"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["timeoutSeconds"] <= 10
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    expressions = hook["namespaceSelector"]["matchExpressions"]
    assert {"key": "wif-broker.io/injection", "operator": "In", "values": ["enabled"]} in expressions
    excluded = next(e for e in expressions if e["key"] == "kubernetes.io/metadata.name")
    assert excluded["operator"] == "NotIn"
    assert set(excluded["values"]) == {NAMESPACE, "kube-system"}
    service = _one(docs, "Service")
    assert hook["clientConfig"]["service"] == {
        "name": service["metadata"]["name"],
        "namespace": NAMESPACE,
        "path": "/mutate",
        "port": 443,
    }


def test_timeout_over_ten_seconds_does_not_render() -> None:
    done = _run("template", "wif", str(CHART), "--set", "webhook.timeoutSeconds=11")
    assert done.returncode != 0
    assert "at most 10" in done.stderr


def test_rbac_is_get_serviceaccounts_only() -> None:
    docs = rendered("defaults")
    assert _one(docs, "ClusterRole")["rules"] == [
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get"]}
    ]
    binding = _one(docs, "ClusterRoleBinding")
    account = _one(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_deployment_is_highly_available_restricted_and_ready_only_when_serving() -> None:
    docs = rendered("defaults")
    deployment = _one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    own = container["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    assert own["readOnlyRootFilesystem"] is True
    assert own["capabilities"] == {"drop": ["ALL"]}
    assert own["runAsNonRoot"] is True
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    service = _one(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "https"


def _webhook_flags(variant: str, tmp_path: Path) -> webhook_settings.WebhookSettings:
    """The rendered container args, resolved by the webhook's own settings code."""
    (container,) = _one(rendered(variant), "Deployment")["spec"]["template"]["spec"]["containers"]
    flags = vars(cli.build_parser(webhook=True).parse_args(container["args"]))
    assert flags["command"] == "webhook"
    return webhook_settings.build(flags, {})


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_args_are_accepted_by_the_webhook(variant: str, tmp_path: Path) -> None:
    resolved = _webhook_flags(variant, tmp_path)
    assert str(resolved.webhook_listen) == "0.0.0.0:8443"
    assert str(resolved.admin_listen) == "0.0.0.0:8989", "kubelet probes reach the pod IP"
    if variant == "image-string":
        assert resolved.sidecar_image == "registry.example/wif-broker:0.1.0"
        assert resolved.sidecar_args == ("--zone", "us-east1-b")
    else:
        assert resolved.sidecar_image == "ghcr.io/example/wif-broker:0.1.0"
    if variant == "audience":
        assert resolved.audience == _pods.AUDIENCE
        assert resolved.project_id == "my-project"


def test_bad_audience_value_fails_at_webhook_start(tmp_path: Path) -> None:
    done = _run("template", "wif", str(CHART), "--set", "audience=projects/my-project/pools/x")
    assert done.returncode == 0  # helm cannot know; the webhook refuses it at start-up (exit 2)
    (container,) = _one(tuple(d for d in yaml.safe_load_all(done.stdout) if d), "Deployment")["spec"][
        "template"
    ]["spec"]["containers"]
    flags = vars(cli.build_parser(webhook=True).parse_args(container["args"]))
    with pytest.raises(ConfigError, match="audience"):
        webhook_settings.build(flags, {})


def test_generated_certificate_is_served_for_the_service_name(tmp_path: Path) -> None:
    """The chart's CA and certificate, mounted as the Deployment mounts them, are served by the
    real webhook, and a client that trusts caBundle and dials the Service name accepts them."""
    docs = rendered("defaults")
    secret = _one(docs, "Secret")
    mount = tmp_path / "tls"
    mount.mkdir()
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (mount / key).write_bytes(base64.b64decode(secret["data"][key]))
    (hook,) = _one(docs, "MutatingWebhookConfiguration")["webhooks"]
    service = hook["clientConfig"]["service"]
    api = FakeApiServer(tmp_path / "api")
    (tmp_path / "api").mkdir()
    api.start()
    process = WebhookProcess(
        tmp_path,
        api.write_kubeconfig(tmp_path / "kubeconfig"),
        mount / "tls.crt",
        mount / "tls.key",
        mount / "ca.crt",
        f"--sidecar-image={_pods.IMAGE}",
    )
    try:
        process.wait_ready()
        ctx = ssl.create_default_context(cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode())
        name = f"{service['name']}.{service['namespace']}.svc"  # what the API server dials
        with (
            socket.create_connection(("127.0.0.1", process.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=name) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        assert process.stop() == 0
        api.stop()


def test_values_table_is_generated_from_values_yaml() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chart-values-table"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    for key in ("audience", "sidecar.image", "tls.certManager.enabled"):
        assert f"| `{key}` |" in readme
    assert values["replicaCount"] == 2


def test_values_table_check_fails_on_drift(tmp_path: Path) -> None:
    """Control: the --check mode really compares (an edited description is caught)."""
    loader = importlib.machinery.SourceFileLoader(
        "chart_values_table", str(ROOT / "scripts" / "chart-values-table")
    )
    spec = importlib.util.spec_from_loader("chart_values_table", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    values = (CHART / "values.yaml").read_text(encoding="utf-8")
    assert module.render(readme, values) == readme
    edited = values.replace("# -- Webhook image pull policy.", "# -- Pull policy of the webhook image.")
    assert module.render(readme, edited) != readme

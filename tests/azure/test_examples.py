"""The shipped Azure examples (config/azure/, k8s/azure/) are valid and wired the way the broker needs.

The VM credential file is exactly what gcloud writes for ``--azure``, the AKS
token file what it writes for the webhook's token file; the azure-identity file
is the VM file plus ``azure_resource``. The systemd unit and
the env file are parsed like the AWS ones. Kubernetes manifests validate
(strict, offline) against the Kubernetes schema, and the AKS workload identity
pod keeps the contract: the webhook label and annotation, the broker as a
native sidecar holding the only Azure identity, the env bundle for the app.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker import cli, credconfig, settings
from tests._examples import BUNDLE, env_file, gcloud_cred_config, systemd_broker
from tests.azure._harness import (
    AKS_TOKEN_CREDENTIALS,
    EXAMPLES,
    IDENTITY_CREDENTIALS,
    PLACEHOLDERS,
    ROOT,
    VM_CREDENTIALS,
)

K8S_AZURE = ROOT / "k8s" / "azure"
MANIFESTS = sorted(K8S_AZURE.glob("*.yaml"))
BROKER_IMAGE = "ghcr.io/example/wif-broker"
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
FILLED = {**PLACEHOLDERS, "CLIENT_ID": "5d8c7e61-0000-4000-a000-00000000c11e"}


def fill(text: str) -> str:
    for key, value in FILLED.items():
        text = text.replace(key, value)
    return text


def _docs() -> list[tuple[Path, int, dict[str, Any]]]:
    found = []
    for path in MANIFESTS:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is not None:
                found.append((path, index, doc))
    return found


DOCS = _docs()


def _of(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, _, d in DOCS if d["kind"] == kind]
    return doc


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


# --------------------------------------------------------------------------------------------
# config/azure/


def test_vm_credentials_are_what_gcloud_writes(tmp_path: Path) -> None:
    info = json.loads(VM_CREDENTIALS.read_text(encoding="utf-8"))
    app_id_uri = info["credential_source"]["url"].split("resource=", 1)[1]
    assert gcloud_cred_config(tmp_path, info, "--azure", "--app-id-uri=" + app_id_uri) == info


def test_aks_token_credentials_are_what_gcloud_writes(tmp_path: Path) -> None:
    info = json.loads(AKS_TOKEN_CREDENTIALS.read_text(encoding="utf-8"))
    written = gcloud_cred_config(
        tmp_path,
        info,
        "--credential-source-file=/var/run/secrets/azure/tokens/azure-identity-token",
        "--credential-source-type=text",
    )
    assert written == info
    assert isinstance(credconfig.parse(json.loads(fill(json.dumps(info)))).source, credconfig.FileSource)


def test_identity_credentials_are_the_gcloud_file_plus_azure_resource() -> None:
    vm = json.loads(VM_CREDENTIALS.read_text(encoding="utf-8"))
    identity = json.loads(IDENTITY_CREDENTIALS.read_text(encoding="utf-8"))
    resource = identity["credential_source"].pop("azure_resource")
    assert identity == vm
    assert vm["credential_source"]["url"].endswith("resource=" + resource)


def test_vm_systemd_unit_runs_the_broker_on_loopback_with_the_file(tmp_path: Path) -> None:
    credentials = fill(VM_CREDENTIALS.read_text(encoding="utf-8"))
    resolved = systemd_broker(EXAMPLES / "wif-broker.service", credentials, tmp_path)
    assert isinstance(resolved.cred.source, credconfig.UrlSource)


def test_vm_metadata_env_is_the_env_bundle() -> None:
    assert env_file(EXAMPLES / "metadata.env") == BUNDLE


# --------------------------------------------------------------------------------------------
# k8s/azure/


def test_aks_examples_exist() -> None:
    kinds = {(p.name, d["kind"]) for p, _, d in DOCS}
    assert kinds == {
        ("aks-workload-identity.yaml", "ServiceAccount"),
        ("aks-workload-identity.yaml", "ConfigMap"),
        ("aks-workload-identity.yaml", "Deployment"),
    }


@pytest.mark.parametrize("item", DOCS, ids=lambda i: f"{i[0].name}#{i[1]}:{i[2]['kind']}")
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.usefixtures("no_network")
def test_aks_manifest_validates_against_kubernetes_schema(
    item: tuple[Path, int, dict[str, Any]], version: str
) -> None:
    kubernetes_validate.validate(item[2], version, strict=True)


def test_aks_workload_identity_pod_wiring(tmp_path: Path) -> None:
    account, config_map = _of("ServiceAccount"), _of("ConfigMap")
    template = _of("Deployment")["spec"]["template"]
    pod = template["spec"]

    # The webhook mutates only labelled pods, and takes the identity from the service account.
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert account["metadata"]["annotations"]["azure.workload.identity/client-id"] == "CLIENT_ID"
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], "token readable"

    # The credential file: the azure_resource example, unmodified.
    shipped = json.loads(IDENTITY_CREDENTIALS.read_text(encoding="utf-8"))
    assert json.loads(config_map["data"]["credentials.json"]) == shipped

    (broker,) = [c for c in pod["initContainers"] if c["image"].startswith(BROKER_IMAGE)]
    assert broker["restartPolicy"] == "Always", "native sidecar"
    env = _env(broker)
    assert not [k for k in env if k.startswith("AZURE_")], "the webhook injects these"
    cred_path = PurePosixPath(env["WIF_BROKER_CREDENTIALS"])
    (mount,) = [m for m in broker["volumeMounts"] if m["mountPath"] == str(cred_path.parent)]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    copy = tmp_path / "credentials.json"
    copy.write_text(fill(config_map["data"]["credentials.json"]), encoding="utf-8")
    flags = vars(cli.build_parser().parse_args(broker.get("args", ["run"])))
    resolved = settings.build(flags, {**env, "WIF_BROKER_CREDENTIALS": str(copy)})
    assert resolved.cred.source == credconfig.AzureSource("api://wif-broker")
    assert [str(a) for a in resolved.listen] == ["127.0.0.1:8988"]
    assert resolved.admin_listen.host == "0.0.0.0", "the kubelet probes the pod IP"
    assert broker["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert broker["livenessProbe"]["httpGet"]["path"] == "/healthz"

    # Only the broker holds the Azure identity; the app gets the env bundle and nothing else.
    skipped = set(template["metadata"]["annotations"]["azure.workload.identity/skip-containers"].split(";"))
    assert skipped == {c["name"] for c in pod["containers"]}
    for app in pod["containers"]:
        app_env = _env(app)
        assert {k: app_env.get(k) for k in BUNDLE} == BUNDLE, app["name"]
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in app_env, "ADC would bypass the broker"
        assert not [k for k in app_env if k.startswith("AZURE_")]
    aliases = {h: a["ip"] for a in pod["hostAliases"] for h in a["hostnames"]}
    assert aliases["metadata.google.internal"] == "127.0.0.1"

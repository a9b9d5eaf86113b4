"""The real webhook process answers AdmissionReviews as SPEC §9 says.

Every injected pod is the API server's pod with the returned JSONPatch applied by a
JSON Patch library, then validated against the Kubernetes schema (1.29 and latest),
and its sidecar's args resolved by the sidecar's own settings code.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import kubernetes_validate
import pytest

from broker import cli, credconfig, settings
from broker.webhook import kube
from tests.webhook import _pods
from tests.webhook._fakeapi import FakeApiServer
from tests.webhook._process import Answer, WebhookProcess

K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
BUNDLE_KEYS = ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT", "METADATA_EMULATOR_HOST")
GKE = "iam.gke.io/gcp-service-account"


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<valueFrom>") for e in container.get("env", [])}


def _sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = pod["spec"]["initContainers"][0]
    assert first["name"] == "wif-broker", "the sidecar is first, so it starts before other init containers"
    return first


def _validated(answer: Answer, pod: dict[str, Any]) -> dict[str, Any]:
    assert answer.allowed, answer.message
    assert answer.uid_matches
    patched = answer.apply(pod)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)
    return patched


def _sidecar_settings(pod: dict[str, Any]) -> settings.Settings:
    """What the injected sidecar resolves its args to (it would exit 2 otherwise)."""
    flags = vars(cli.build_parser().parse_args(_sidecar(pod)["args"]))
    assert flags["command"] == "run"
    return settings.build(flags, environ={})


def _sa(apiserver: FakeApiServer, name: str, **annotations: str) -> str:
    apiserver.add("team-a", name, annotations)
    return name


def _unchanged_apart_from_injection(before: dict[str, Any], after: dict[str, Any]) -> None:
    """The patch touches nothing else in the pod (SPEC §9)."""
    after = copy.deepcopy(after)
    spec = after["spec"]
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "wif-broker"]
    if not spec["initContainers"] and "initContainers" not in before["spec"]:
        del spec["initContainers"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "wif-broker-token"]
    if not spec["volumes"] and "volumes" not in before["spec"]:
        del spec["volumes"]
    if "hostAliases" not in before["spec"]:
        assert spec.pop("hostAliases") == [{"ip": "127.0.0.1", "hostnames": ["metadata.google.internal"]}]
    for field in ("containers", "initContainers"):
        for old, new in zip(before["spec"].get(field, []), spec.get(field, []), strict=True):
            kept = {e["name"] for e in old.get("env", [])}
            new["env"] = [e for e in new.get("env", []) if e["name"] in kept]
            if not new["env"] and "env" not in old:
                del new["env"]
            for e in new.get("env", []):
                if e["name"] in ("NO_PROXY", "no_proxy") and "value" in e:
                    original = next(o for o in old["env"] if o["name"] == e["name"])
                    assert e["value"].startswith(original["value"]), "merged: the app's entries first"
                    e["value"] = original["value"]
    assert after == before


def test_deployment_pod_gets_the_sidecar_token_and_env(webhook: WebhookProcess) -> None:
    pod = _pods.deployment_pod("app")
    assert "name" not in pod["metadata"], "a ReplicaSet's pod is admitted with generateName only"
    patched = _validated(webhook.review(pod), pod)
    sidecar = _sidecar(patched)
    assert sidecar["image"] == _pods.IMAGE
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "wif-broker"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "wif-broker"}
    assert sidecar["ports"] == [{"name": "wif-broker", "containerPort": 8989, "protocol": "TCP"}]
    ctx = sidecar["securityContext"]
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["runAsNonRoot"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["volumeMounts"] == [
        {"name": "wif-broker-token", "mountPath": "/var/run/secrets/wif-broker", "readOnly": True}
    ]
    resolved = _sidecar_settings(patched)
    assert resolved.cred.audience == _pods.AUDIENCE
    assert resolved.service_account_email == _pods.SA_EMAIL
    assert resolved.project_id == "my-project"
    assert [str(a) for a in resolved.listen] == ["127.0.0.1:8988"]
    assert str(resolved.admin_listen) == "0.0.0.0:8989"
    assert resolved.cred.source == credconfig.FileSource("/var/run/secrets/wif-broker/token")
    (volume,) = [v for v in patched["spec"]["volumes"] if v["name"] == "wif-broker-token"]
    assert volume["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "path": "token",
                "audience": "https:" + _pods.AUDIENCE,
                "expirationSeconds": 3600,
            }
        }
    ]
    app = patched["spec"]["containers"][0]
    assert all(_env(app)[k] == "127.0.0.1:8988" for k in BUNDLE_KEYS)
    assert "127.0.0.1" in _env(app)["NO_PROXY"].split(",")
    assert _env(app)["no_proxy"] == _env(app)["NO_PROXY"]
    assert not any(m["name"] == "wif-broker-token" for m in app["volumeMounts"]), "token: sidecar only"
    assert patched["spec"]["hostAliases"] == [{"ip": "127.0.0.1", "hostnames": ["metadata.google.internal"]}]
    _unchanged_apart_from_injection(pod, patched)


def test_job_pod_keeps_its_restart_policy_and_can_finish(webhook: WebhookProcess) -> None:
    pod = _pods.job_pod("app")
    patched = _validated(webhook.review(pod), pod)
    assert patched["spec"]["restartPolicy"] == "Never"
    # A restartPolicy: Always init container does not hold the Job open; a plain container would.
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app"]
    assert _sidecar(patched)["restartPolicy"] == "Always"
    _unchanged_apart_from_injection(pod, patched)


def test_existing_env_is_kept_and_no_proxy_merged(webhook: WebhookProcess) -> None:
    pod = _pods.deployment_pod("app")
    pod["spec"]["containers"][0]["env"] = [
        {"name": "GCE_METADATA_HOST", "value": "10.0.0.9:80"},
        {"name": "NO_PROXY", "value": "corp.example,.svc"},
        {"name": "no_proxy", "valueFrom": {"configMapKeyRef": {"name": "proxy", "key": "no_proxy"}}},
        {"name": "LOG", "value": "debug"},
    ]
    patched = _validated(webhook.review(pod), pod)
    env = _env(patched["spec"]["containers"][0])
    assert env["GCE_METADATA_HOST"] == "10.0.0.9:80", "a variable the container sets is left as it is"
    assert env["NO_PROXY"].split(",")[:2] == ["corp.example", ".svc"]
    assert {"127.0.0.1", "localhost", "metadata.google.internal"} <= set(env["NO_PROXY"].split(","))
    assert env["no_proxy"] == "<valueFrom>", "a value from elsewhere cannot be merged; it stays"
    assert env["LOG"] == "debug"
    assert env["GCE_METADATA_ROOT"] == "127.0.0.1:8988"
    names = [e["name"] for e in patched["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names)), "no duplicate env names"
    _unchanged_apart_from_injection(pod, patched)


def test_one_spelling_of_no_proxy_carries_over_to_the_other(webhook: WebhookProcess) -> None:
    """curl reads no_proxy first, Python NO_PROXY: an exemption the app set in one
    spelling must not be lost in the spelling the webhook adds."""
    pod = _pods.deployment_pod("app")
    pod["spec"]["containers"][0]["env"] = [{"name": "NO_PROXY", "value": "corp.example"}]
    patched = _validated(webhook.review(pod), pod)
    env = _env(patched["spec"]["containers"][0])
    assert env["NO_PROXY"] == env["no_proxy"]
    assert env["no_proxy"].startswith("corp.example,127.0.0.1,")


def test_init_containers_get_env_and_the_sidecar_goes_first(webhook: WebhookProcess) -> None:
    pod = _pods.with_containers(_pods.deployment_pod("app"), "app", "worker", init=("migrate", "seed"))
    patched = _validated(webhook.review(pod), pod)
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["wif-broker", "migrate", "seed"]
    for container in [*patched["spec"]["initContainers"][1:], *patched["spec"]["containers"]]:
        assert _env(container)["GCE_METADATA_HOST"] == "127.0.0.1:8988", container["name"]
    assert "env" not in _sidecar(patched)
    _unchanged_apart_from_injection(pod, patched)


def test_skip_containers_keeps_the_env_out(webhook: WebhookProcess) -> None:
    pod = _pods.with_containers(_pods.deployment_pod("app"), "app", "istio-proxy", init=("istio-init",))
    pod["metadata"]["annotations"] = {"wif-broker.io/skip-containers": "istio-proxy, istio-init"}
    patched = _validated(webhook.review(pod), pod)
    by_name = {c["name"]: c for c in [*patched["spec"]["initContainers"], *patched["spec"]["containers"]]}
    assert "GCE_METADATA_HOST" in _env(by_name["app"])
    assert "env" not in by_name["istio-proxy"]
    assert "env" not in by_name["istio-init"]


def test_existing_host_alias_is_not_duplicated(webhook: WebhookProcess) -> None:
    pod = _pods.deployment_pod(
        "app", hostAliases=[{"ip": "10.1.1.1", "hostnames": ["db.internal", "metadata.google.internal"]}]
    )
    patched = _validated(webhook.review(pod), pod)
    assert patched["spec"]["hostAliases"] == pod["spec"]["hostAliases"]
    other = _pods.deployment_pod("app", hostAliases=[{"ip": "10.1.1.1", "hostnames": ["db.internal"]}])
    patched = _validated(webhook.review(other), other)
    assert patched["spec"]["hostAliases"][1] == {"ip": "127.0.0.1", "hostnames": ["metadata.google.internal"]}


def test_reinvocation_is_idempotent(webhook: WebhookProcess, apiserver: FakeApiServer) -> None:
    pod = _pods.deployment_pod("app")
    patched = _validated(webhook.review(pod), pod)
    reads = len(apiserver.reads)
    again = webhook.review(patched)
    assert again.allowed
    assert again.patch == []
    assert "patchType" not in again.raw["response"]
    assert len(apiserver.reads) == reads, "an injected pod needs no ServiceAccount read"


def test_pod_opt_out_is_allowed_unpatched_without_a_read(
    webhook: WebhookProcess, apiserver: FakeApiServer
) -> None:
    pod = _pods.deployment_pod("app")
    pod["metadata"]["annotations"] = {"wif-broker.io/inject": "false"}
    reads = len(apiserver.reads)
    answer = webhook.review(pod)
    assert answer.allowed
    assert answer.patch == []
    assert len(apiserver.reads) == reads


def test_pod_not_opted_in_is_allowed_unpatched(webhook: WebhookProcess, apiserver: FakeApiServer) -> None:
    for sa in ("default", _sa(apiserver, "plain", team="a")):
        answer = webhook.review(_pods.deployment_pod(sa))
        assert answer.allowed
        assert answer.patch == []


def test_audience_override_sets_both_audiences(webhook: WebhookProcess, apiserver: FakeApiServer) -> None:
    other = (
        "//iam.googleapis.com/projects/999888777666/locations/global/workloadIdentityPools/p2/providers/eks"
    )
    sa = _sa(apiserver, "override", **{GKE: _pods.SA_EMAIL, "wif-broker.io/audience": other})
    pod = _pods.deployment_pod(sa)
    patched = _validated(webhook.review(pod), pod)
    assert _sidecar_settings(patched).cred.audience == other
    (volume,) = [v for v in patched["spec"]["volumes"] if v["name"] == "wif-broker-token"]
    assert volume["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "https:" + other


def test_direct_access_takes_the_project_from_the_service_account(
    webhook: WebhookProcess, apiserver: FakeApiServer
) -> None:
    sa = _sa(apiserver, "direct", **{"wif-broker.io/inject": "true", "wif-broker.io/project-id": "data-proj"})
    pod = _pods.deployment_pod(sa)
    patched = _validated(webhook.review(pod), pod)
    resolved = _sidecar_settings(patched)
    assert not resolved.impersonating
    assert resolved.project_id == "data-proj"
    assert not any(a.startswith("--service-account") for a in _sidecar(patched)["args"])


def test_direct_access_without_a_project_is_refused(
    webhook: WebhookProcess, apiserver: FakeApiServer
) -> None:
    sa = _sa(apiserver, "direct-noproj", **{"wif-broker.io/inject": "true"})
    answer = webhook.review(_pods.deployment_pod(sa))
    assert not answer.allowed
    assert answer.patch == []
    assert "team-a/app-7d9f8b6c5d-*" in answer.message
    assert "ServiceAccount team-a/direct-noproj" in answer.message
    assert "wif-broker.io/project-id" in answer.message
    assert answer.raw["response"]["status"]["code"] == 403


def test_annotation_that_is_not_an_email_is_refused(
    webhook: WebhookProcess, apiserver: FakeApiServer
) -> None:
    sa = _sa(apiserver, "typo", **{GKE: "app-at-my-project"})
    answer = webhook.review(_pods.job_pod(sa))
    assert not answer.allowed
    assert "app-at-my-project" in answer.message
    assert "NAME@PROJECT.iam.gserviceaccount.com" in answer.message
    assert "pod team-a/report-28940310-*" in answer.message


def test_name_clashes_are_refused_not_left_to_api_validation(webhook: WebhookProcess) -> None:
    clash = _pods.with_containers(_pods.deployment_pod("app"), "app", "wif-broker")
    answer = webhook.review(clash)
    assert not answer.allowed
    assert "container named 'wif-broker'" in answer.message
    volume = _pods.deployment_pod("app")
    volume["spec"]["volumes"].append({"name": "wif-broker-token", "emptyDir": {}})
    answer = webhook.review(volume)
    assert not answer.allowed
    assert "volume named 'wif-broker-token'" in answer.message
    port = _pods.deployment_pod("app")
    port["spec"]["containers"][0]["ports"] = [{"name": "metrics", "containerPort": 8989, "protocol": "TCP"}]
    answer = webhook.review(port)
    assert not answer.allowed
    assert "uses port 8989" in answer.message


def test_host_network_is_refused(webhook: WebhookProcess) -> None:
    answer = webhook.review(_pods.deployment_pod("app", hostNetwork=True))
    assert not answer.allowed
    assert "hostNetwork" in answer.message
    assert "fix:" in answer.message


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        ("missing", "does not exist"),
        ("forbidden", "get on serviceaccounts"),
        ("error", "HTTP 500"),
    ],
)
def test_unreadable_service_account_is_refused(
    webhook: WebhookProcess, apiserver: FakeApiServer, failure: str, expected: str
) -> None:
    name = f"sa-{failure}"
    if failure != "missing":
        apiserver.add("team-a", name, {GKE: _pods.SA_EMAIL})
        apiserver.failures[("team-a", name)] = failure
    answer = webhook.review(_pods.deployment_pod(name))
    assert not answer.allowed
    assert f"ServiceAccount team-a/{name}" in answer.message
    assert expected in answer.message


def test_hanging_api_server_is_refused_within_ten_seconds(
    webhook: WebhookProcess, apiserver: FakeApiServer
) -> None:
    apiserver.add("team-a", "sa-hang", {GKE: _pods.SA_EMAIL})
    apiserver.failures[("team-a", "sa-hang")] = "hang"
    began = time.monotonic()
    answer = webhook.review(_pods.deployment_pod("sa-hang"))
    elapsed = time.monotonic() - began
    assert not answer.allowed
    assert "did not return ServiceAccount team-a/sa-hang" in answer.message
    assert elapsed < 10, f"answered after {elapsed:.1f} s; the API server gives up at timeoutSeconds"


def test_other_kinds_and_operations_pass_unpatched(webhook: WebhookProcess) -> None:
    pod = _pods.deployment_pod("app")
    update = webhook.review(pod, operation="UPDATE")
    assert update.allowed
    assert update.patch == []
    body = _pods.review(pod)
    body["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    reply = webhook.post(body).json()["response"]
    assert reply["allowed"] is True
    assert "patch" not in reply


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}',
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}',
        b"[]",
    ],
)
def test_malformed_review_is_a_400(webhook: WebhookProcess, body: bytes) -> None:
    reply = webhook.session.post(
        webhook.url,
        data=body,
        headers={"Content-Type": "application/json"},
        verify=str(webhook.ca_file),
        timeout=10,
    )
    assert reply.status_code == 400


def test_api_server_saw_only_service_account_reads(webhook: WebhookProcess, apiserver: FakeApiServer) -> None:
    webhook.review(_pods.deployment_pod("app"))
    assert apiserver.unexpected == []
    assert apiserver.reads
    assert {ns for ns, _ in apiserver.reads} == {"team-a"}


def test_metrics_count_admissions_by_outcome(webhook: WebhookProcess) -> None:
    before = webhook.metrics()
    webhook.review(_pods.deployment_pod("app"))
    webhook.review(_pods.deployment_pod("app", hostNetwork=True))
    after = webhook.metrics()

    def delta(outcome: str) -> float:
        key = f'wif_broker_webhook_admissions_total{{outcome="{outcome}"}}'
        return after[key] - before[key]

    assert delta("injected") == 1
    assert delta("refused") == 1
    assert delta("opted_out") == 0
    assert not any("team-a" in key or "app" in key.split("{")[1] for key in after if "{" in key), (
        "no per-pod labels"
    )


def test_admin_listener_health(webhook: WebhookProcess) -> None:
    assert webhook.session.get(webhook.admin_url + "/healthz", timeout=5).status_code == 200
    ready = webhook.session.get(webhook.admin_url + "/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "http://proxy:3128"),
        ({"https_proxy": "http://proxy:3128", "NO_PROXY": "10.0.0.1"}, None),
        ({"HTTPS_PROXY": "http://proxy:3128", "no_proxy": ".cluster.local,10.0.0.1"}, None),
        ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "*"}, None),
        ({"HTTP_PROXY": "http://proxy:3128"}, None),
    ],
)
def test_api_server_proxy_is_resolved_once_like_client_go(
    environ: dict[str, str], expected: str | None
) -> None:
    assert kube._proxy("https://10.0.0.1:443", environ) == expected

"""The shipped AWS examples (config/aws/) are valid, and wired the way the broker needs.

ECS task definitions are checked with botocore's own parameter validator
against the ``RegisterTaskDefinition`` input shape (what ``aws ecs
register-task-definition --cli-input-json`` sends); Kubernetes manifests with
kubernetes-validate (strict, offline); the credential file with the broker's
own parser, and against what gcloud writes. The invariants are the ones a
deployment breaks silently: the app must wait for a HEALTHY broker, get the
env bundle, and carry no credentials of its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import botocore.session
import botocore.validate
import kubernetes_validate
import pytest
import yaml

from broker import cli, credconfig, envbundle, settings
from tests._examples import BUNDLE, env_file, gcloud_cred_config, systemd_broker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "config" / "aws"
CREDENTIALS = EXAMPLES / "credentials-aws.json"
ECS_TASKS = sorted(EXAMPLES.glob("ecs-task-*.json"))
MANIFESTS = sorted(EXAMPLES.glob("*.yaml"))
BROKER_IMAGE = "ghcr.io/example/wif-broker"
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
PLACEHOLDERS = {
    "PROJECT_NUMBER": "123456789012",
    "PROJECT_ID": "my-project",
    "POOL": "aws-pool",
    "PROVIDER": "aws-provider",
    "ACCOUNT_ID": "111122223333",
    "REGION": "eu-west-1",
}


def fill(text: str) -> str:
    for key, value in PLACEHOLDERS.items():
        text = text.replace(key, value)
    return text


def ecs_shape() -> Any:
    model = botocore.session.get_session().get_service_model("ecs")
    return model.operation_model("RegisterTaskDefinition").input_shape


def ecs_errors(params: dict[str, Any]) -> str:
    report = botocore.validate.ParamValidator().validate(params, ecs_shape())
    return str(report.generate_report()) if report.has_errors() else ""


def load_task(path: Path) -> dict[str, Any]:
    task: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return task


def broker_settings(env: dict[str, str], argv: list[str], tmp_path: Path) -> settings.Settings:
    """The broker's settings from a container's env and arguments, as ``wif-broker`` resolves them."""
    known = {settings.ENV_PREFIX + n.upper().replace("-", "_") for n in settings.NAMES}
    assert set(env) - {"AWS_REGION"} <= known, "unknown WIF_BROKER_* variable"
    resolved_env = {k: fill(v) for k, v in env.items()}
    key = settings.ENV_PREFIX + "CREDENTIALS"
    if key in env:
        copy = tmp_path / "credentials.json"
        copy.write_text(fill(CREDENTIALS.read_text(encoding="utf-8")), encoding="utf-8")
        resolved_env[key] = str(copy)
    flags = vars(cli.build_parser().parse_args(argv or ["run"]))
    assert flags["command"] == "run"
    return settings.build(flags, resolved_env)


def no_own_credentials(env: dict[str, str], who: str) -> None:
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env, f"{who}: ADC would bypass the broker"
    assert not [k for k in env if k.startswith("AWS_")], f"{who}: the app needs no AWS credentials"


# --------------------------------------------------------------------------------------------
# The credential file


def test_credentials_file_parses_as_aws1_with_imdsv2() -> None:
    text = CREDENTIALS.read_text(encoding="utf-8")
    assert "projects/PROJECT_NUMBER/" in text
    assert "app@PROJECT_ID.iam.gserviceaccount.com" in text
    cred = credconfig.parse(json.loads(fill(text)))
    assert isinstance(cred.source, credconfig.AwsSource)
    assert cred.subject_token_type == credconfig.AWS_TOKEN_TYPE
    assert cred.source.imdsv2_session_token_url == "http://169.254.169.254/latest/api/token"
    assert "{region}" in cred.source.regional_cred_verification_url
    assert cred.service_account_email == "app@my-project.iam.gserviceaccount.com"
    assert cred.project_number == PLACEHOLDERS["PROJECT_NUMBER"]


def test_credentials_file_is_what_gcloud_writes(tmp_path: Path) -> None:
    info = json.loads(CREDENTIALS.read_text(encoding="utf-8"))
    assert gcloud_cred_config(tmp_path, info, "--aws", "--enable-imdsv2") == info


# --------------------------------------------------------------------------------------------
# ECS task definitions


def test_ecs_examples_exist() -> None:
    assert {p.name for p in ECS_TASKS} == {"ecs-task-ec2.json", "ecs-task-fargate.json"}


@pytest.mark.parametrize("path", ECS_TASKS, ids=lambda p: p.name)
def test_ecs_task_definition_validates_against_register_task_definition(path: Path) -> None:
    assert ecs_errors(load_task(path)) == ""


def test_ecs_validation_is_meaningful() -> None:
    """Control: botocore's validator rejects a misspelt member and a wrong type."""
    task = load_task(ECS_TASKS[0])
    task["containerDefinitions"][0]["healthcheck"] = task["containerDefinitions"][0].pop("healthCheck")
    assert 'Unknown parameter in containerDefinitions[0]: "healthcheck"' in ecs_errors(task)
    task = load_task(ECS_TASKS[0])
    task["containerDefinitions"][1]["dependsOn"][0]["condition"] = ["HEALTHY"]
    assert "Invalid type for parameter containerDefinitions[1].dependsOn[0].condition" in ecs_errors(task)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("environment", [])}


def _address(env: dict[str, str], name: str, default: str) -> settings.Address:
    value = env.get(settings.ENV_PREFIX + name.upper().replace("-", "_"), default)
    return settings.parse_address(name, value)


@pytest.mark.parametrize("path", ECS_TASKS, ids=lambda p: p.name)
def test_ecs_task_wiring(path: Path) -> None:
    task = load_task(path)
    # awsvpc: one network namespace per task, so the app reaches the broker on 127.0.0.1.
    assert task["networkMode"] == "awsvpc"
    assert task["taskRoleArn"].startswith("arn:aws:iam::ACCOUNT_ID:role/")
    if "FARGATE" in task["requiresCompatibilities"]:
        assert task["cpu"], "Fargate needs task-level cpu"
        assert task["memory"], "Fargate needs task-level memory"
    containers = {c["name"]: c for c in task["containerDefinitions"]}
    (broker,) = [c for c in containers.values() if c["image"].startswith(BROKER_IMAGE)]
    assert broker["essential"] is True
    assert broker["readonlyRootFilesystem"] is True

    env = _env(broker)
    listen = _address(env, "listen", "127.0.0.1:8988")
    admin = _address(env, "admin-listen", "0.0.0.0:8989")
    assert str(listen) == "127.0.0.1:8988"
    if settings.ENV_PREFIX + "CREDENTIALS" in env:
        # The file is mounted where the broker looks for it.
        cred_dir = str(PurePosixPath(env[settings.ENV_PREFIX + "CREDENTIALS"]).parent)
        (mount,) = [m for m in broker["mountPoints"] if m["containerPath"] == cred_dir]
        assert mount["readOnly"] is True
        assert mount["sourceVolume"] in {v["name"] for v in task["volumes"]}

    # The health check: no shell, no curl; the image's python asks /readyz on the admin port.
    check = broker["healthCheck"]
    assert check["command"][:3] == ["CMD", "/opt/wif-broker/bin/python", "-c"]
    assert f"http://127.0.0.1:{admin.port}/readyz" in check["command"][3]
    assert 5 <= check["interval"] <= 300
    assert 2 <= check["timeout"] < check["interval"]
    assert 1 <= check["retries"] <= 10
    assert 0 <= check["startPeriod"] <= 300

    apps = [c for c in containers.values() if c is not broker]
    assert apps
    for app in apps:
        assert {"containerName": broker["name"], "condition": "HEALTHY"} in app["dependsOn"], app["name"]
        app_env = _env(app)
        assert {k: app_env.get(k) for k in BUNDLE} == envbundle.bundle(listen), app["name"]
        no_own_credentials(app_env, app["name"])


@pytest.mark.parametrize(
    "path",
    ECS_TASKS,
    ids=lambda p: p.name,
)
def test_ecs_broker_settings_resolve(path: Path, tmp_path: Path) -> None:
    """The broker container's env resolves to the same identity as the credential file."""
    (broker,) = [c for c in load_task(path)["containerDefinitions"] if c["image"].startswith(BROKER_IMAGE)]
    resolved = broker_settings(_env(broker), broker.get("command", []), tmp_path)
    assert isinstance(resolved.cred.source, credconfig.AwsSource)
    assert resolved.cred.subject_token_type == credconfig.AWS_TOKEN_TYPE
    assert not resolved.aws_strict, "the botocore chain is what finds the task role"
    assert [str(a) for a in resolved.listen] == ["127.0.0.1:8988"]
    expected = json.loads(fill(CREDENTIALS.read_text(encoding="utf-8")))
    assert resolved.cred.audience == expected["audience"]
    assert resolved.service_account_email == credconfig.email_from_impersonation_url(
        expected["service_account_impersonation_url"]
    )


class _Readyz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def readyz() -> Iterator[tuple[ThreadingHTTPServer, type[_Readyz]]]:
    handler = type("Handler", (_Readyz,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", ECS_TASKS, ids=lambda p: p.name)
def test_ecs_health_check_command_follows_readiness(
    path: Path, readyz: tuple[ThreadingHTTPServer, type[_Readyz]]
) -> None:
    """Run the health check's own code: exit 0 when ready, non-zero when not, never via a proxy."""
    server, handler = readyz
    (broker,) = [c for c in load_task(path)["containerDefinitions"] if c["image"].startswith(BROKER_IMAGE)]
    code = broker["healthCheck"]["command"][3].replace(":8989/", f":{server.server_address[1]}/")
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
    env = {**os.environ, "HTTP_PROXY": proxy, "http_proxy": proxy}

    def run() -> int:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=20)
        return done.returncode

    handler.status = 200
    assert run() == 0
    handler.status = 503
    assert run() != 0


# --------------------------------------------------------------------------------------------
# EKS manifests


def _docs() -> list[tuple[Path, int, dict[str, Any]]]:
    docs = []
    for path in MANIFESTS:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is not None:
                docs.append((path, index, doc))
    return docs


DOCS = _docs()


def _doc_id(item: tuple[Path, int, dict[str, Any]]) -> str:
    return f"{item[0].name}#{item[1]}:{item[2].get('kind')}"


def _of(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for p, _, d in DOCS if p == path and d["kind"] == kind]
    return doc


def test_eks_examples_exist() -> None:
    kinds = {(p.name, d["kind"]) for p, _, d in DOCS}
    for name in ("eks-irsa.yaml", "eks-pod-identity.yaml"):
        assert {(name, "ServiceAccount"), (name, "ConfigMap"), (name, "Deployment")} <= kinds


@pytest.mark.parametrize("item", DOCS, ids=_doc_id)
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.usefixtures("no_network")
def test_eks_manifest_validates_against_kubernetes_schema(
    item: tuple[Path, int, dict[str, Any]], version: str
) -> None:
    kubernetes_validate.validate(item[2], version, strict=True)


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_eks_pod_wiring(path: Path, tmp_path: Path) -> None:
    account = _of(path, "ServiceAccount")
    config_map = _of(path, "ConfigMap")
    template = _of(path, "Deployment")["spec"]["template"]
    pod = template["spec"]
    # The same, unmodified aws1 file as on EC2 and ECS.
    assert json.loads(config_map["data"]["credentials.json"]) == json.loads(CREDENTIALS.read_text("utf-8"))

    role_arn = account["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")
    if path.name == "eks-irsa.yaml":
        assert role_arn == "arn:aws:iam::ACCOUNT_ID:role/wif-broker-app"
    else:
        assert role_arn is None, "Pod Identity uses an association, not the IRSA annotation"
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], "token readable"

    (broker,) = [c for c in pod["initContainers"] if c["image"].startswith(BROKER_IMAGE)]
    assert broker["restartPolicy"] == "Always", "native sidecar"
    env = _k8s_env(broker)
    resolved = broker_settings(env, [*broker.get("command", [])[1:], *broker.get("args", [])], tmp_path)
    assert isinstance(resolved.cred.source, credconfig.AwsSource)
    assert not resolved.aws_strict
    assert [str(a) for a in resolved.listen] == ["127.0.0.1:8988"]
    assert broker["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert broker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    assert ports[broker["startupProbe"]["httpGet"]["port"]] == resolved.admin_listen.port
    assert resolved.admin_listen.host == "0.0.0.0", "the kubelet probes the pod IP"

    # The credential file is mounted where WIF_BROKER_CREDENTIALS points.
    volumes = {v["name"]: v for v in pod["volumes"]}
    cred_dir = str(PurePosixPath(env[settings.ENV_PREFIX + "CREDENTIALS"]).parent)
    (mount,) = [m for m in broker["volumeMounts"] if m["mountPath"] == cred_dir]
    assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]

    # The webhook injects AWS credentials into the broker only.
    skipped = set(template["metadata"]["annotations"]["eks.amazonaws.com/skip-containers"].split(","))
    assert skipped == {c["name"] for c in pod["containers"]}
    for container in pod["containers"]:
        app_env = _k8s_env(container)
        assert {k: app_env.get(k) for k in BUNDLE} == envbundle.bundle(resolved.listen[0]), container["name"]
        no_own_credentials(app_env, container["name"])
        names = {m["name"] for m in container.get("volumeMounts", [])}
        assert mount["name"] not in names, "only the broker reads the credential file"
    for container in [*pod["initContainers"], *pod["containers"]]:
        own = container["securityContext"]
        assert own["allowPrivilegeEscalation"] is False
        assert own["capabilities"] == {"drop": ["ALL"]}
        assert own["readOnlyRootFilesystem"] is True


# --------------------------------------------------------------------------------------------
# EC2: systemd unit and the apps' environment file


def test_ec2_systemd_unit_runs_the_broker_on_loopback_with_the_file(tmp_path: Path) -> None:
    credentials = fill(CREDENTIALS.read_text(encoding="utf-8"))
    resolved = systemd_broker(EXAMPLES / "wif-broker.service", credentials, tmp_path)
    assert isinstance(resolved.cred.source, credconfig.AwsSource)


def test_ec2_metadata_env_is_the_env_bundle() -> None:
    assert env_file(EXAMPLES / "metadata.env") == BUNDLE

"""What ships next to the code (SPEC §6): ``Dockerfile``, ``.dockerignore``, ``k8s/``, ``config/``.

- Every Kubernetes manifest validates (strict, offline) against the Kubernetes
  schema, and the pods keep the deployment contract: native sidecar, startup
  probe on ``/readyz``, restricted security, the env bundle, consistent paths.
- The Dockerfile's invariants hold, and the exact commands its build stage runs
  install a working ``wif-broker`` into a clean virtual environment (this one
  is the slow test: ~30-60 s, a pip install with dependencies).
- ``config/`` examples parse with the product's own parsers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

import broker
from broker import cli, credconfig, envbundle, fileless, settings
from broker.errors import ConfigError
from tests._examples import gcloud_cred_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
CONFIG = ROOT / "config"
DOCKERFILE = ROOT / "Dockerfile"
CREDENTIALS_EXAMPLE = CONFIG / "credentials-k8s-token.json"
BROKER_IMAGE = "ghcr.io/example/wif-broker:"
# Native sidecars are on by default from 1.29 (beta; GA in 1.33).
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
POD_KINDS = {"Pod", "Deployment", "Job", "CronJob"}
# Placeholder values used to resolve the examples' settings the way the broker would.
PLACEHOLDERS = {
    "PROJECT_NUMBER": "123456789012",
    "PROJECT_ID": "my-project",
    "POOL": "my-pool",
    "PROVIDER": "my-provider",
}
BUNDLE_LOWER = {"no_proxy": "NO_PROXY"}  # lower-case twins some tools read instead


# --------------------------------------------------------------------------------------------
# Dockerfile parsing


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> Iterator[str]:
    """Join backslash continuations; drop comments and blank lines (as BuildKit does)."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        yield pending + line
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"


def parse_dockerfile(text: str) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM, not {keyword}"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), args
    assert all(isinstance(v, str) for v in value), args
    return value


def _env_pairs(args: str) -> dict[str, str]:
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"use ENV KEY=VALUE, not {args!r}"
        pairs[key] = value
    return pairs


def _run_argv(args: str) -> list[str]:
    """A RUN line as argv, without BuildKit flags (--mount=...). Plain commands only."""
    if args.startswith("["):
        return _exec_form(args)
    words = shlex.split(args)
    while words and words[0].startswith("--"):
        words.pop(0)
    assert not {"&&", "||", ";", "|", ">", "<"} & set(words), f"keep RUN lines single commands: {args}"
    return words


def _copy_parts(args: str) -> tuple[dict[str, str], list[str], str]:
    words = shlex.split(args)
    flags = {}
    while words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words[:-1], words[-1]


STAGES = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
FINAL = STAGES[-1]


def _docker_user() -> tuple[int, int]:
    (user,) = FINAL.all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit(), "USER must be numeric (runAsNonRoot checks it)"
    assert not gid or gid.isdigit(), "USER must be numeric (runAsNonRoot checks it)"
    return int(uid), int(gid or uid)


# --------------------------------------------------------------------------------------------
# .dockerignore


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex, i = regex + glob[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def dockerignored(relpath: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = PurePosixPath(relpath).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


# --------------------------------------------------------------------------------------------
# Kubernetes manifests


def _manifests() -> list[tuple[Path, int, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.y*ml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is not None:
                docs.append((path, index, doc))
    return docs


MANIFESTS = _manifests()


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    kind = doc["kind"]
    if kind == "Pod":
        return doc["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def _id(item: tuple[Path, int, dict[str, Any]]) -> str:
    path, index, doc = item
    return f"{path.relative_to(ROOT)}#{index}:{doc.get('kind')}"


POD_MANIFESTS = [m for m in MANIFESTS if m[2].get("kind") in POD_KINDS]


def _only(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, _, d in MANIFESTS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} under k8s/, found {len(found)}"
    return found[0]


def _fill(text: str) -> str:
    for key, value in PLACEHOLDERS.items():
        text = text.replace(key, value)
    return text


def _env(container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        assert "valueFrom" not in item, "examples use literal values"
        env[item["name"]] = item["value"]
    return env


def _effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    own = container.get("securityContext", {})
    return own[key] if key in own else pod.get("securityContext", {}).get(key)


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return int(match)


def _broker_settings(container: dict[str, Any], credentials_json: str, tmp_path: Path) -> settings.Settings:
    """Resolve the broker container's settings (env + args) exactly as the broker does."""
    env = _env(container)
    assert set(env) <= {settings.ENV_PREFIX + n.upper().replace("-", "_") for n in settings.NAMES} | {
        settings.ENV_PREFIX + "CONFIG"
    }, "unknown WIF_BROKER_* variable"
    cred = tmp_path / "credentials.json"
    cred.write_text(_fill(credentials_json), encoding="utf-8")
    env[settings.ENV_PREFIX + "CREDENTIALS"] = str(cred)
    args = [*container.get("command", [])[1:], *container.get("args", [])] or ["run"]
    flags = vars(cli.build_parser().parse_args(args))
    assert flags["command"] == "run"
    return settings.build(flags, env)


# --------------------------------------------------------------------------------------------
# Kubernetes: schema


def test_k8s_has_the_promised_examples() -> None:
    kinds = {(p.relative_to(K8S).as_posix(), d["kind"]) for p, _, d in MANIFESTS}
    assert ("deployment.yaml", "Deployment") in kinds
    assert ("job.yaml", "Job") in kinds
    assert ("serviceaccount.yaml", "ServiceAccount") in kinds
    assert ("credentials-configmap.yaml", "ConfigMap") in kinds
    assert ("transparent/pod-port80.yaml", "Pod") in kinds
    assert ("transparent/iptables-init.yaml", "Pod") in kinds


@pytest.mark.parametrize("item", MANIFESTS, ids=_id)
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.usefixtures("no_network")
def test_k8s_manifest_validates_against_kubernetes_schema(
    item: tuple[Path, int, dict[str, Any]], version: str
) -> None:
    _, _, doc = item
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.usefixtures("no_network")
def test_schema_validation_is_strict() -> None:
    """Control: the validator rejects a misspelt field in the sidecar (so the passes above mean something)."""
    doc = json.loads(json.dumps(_only("Deployment", "app")))
    _pod_spec(doc)["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------------------------
# Kubernetes: the deployment contract


@pytest.mark.parametrize("item", POD_MANIFESTS, ids=_id)
def test_pod_runs_broker_as_native_sidecar_gated_on_readyz(
    item: tuple[Path, int, dict[str, Any]], tmp_path: Path
) -> None:
    _, _, doc = item
    pod = _pod_spec(doc)
    assert not any(c["image"].startswith(BROKER_IMAGE) for c in pod["containers"]), (
        "a regular sidecar never lets a Job finish and does not order start-up"
    )
    (sidecar,) = [c for c in pod.get("initContainers", []) if c["image"].startswith(BROKER_IMAGE)]
    assert sidecar["restartPolicy"] == "Always"
    resolved = _broker_settings(sidecar, _configmap_credentials(), tmp_path)
    # The startup probe is what holds the app containers back until the first token.
    probe = sidecar["startupProbe"]["httpGet"]
    assert probe["path"] == "/readyz"
    assert _resolve_port(sidecar, probe["port"]) == resolved.admin_listen.port
    assert resolved.admin_listen.host == "0.0.0.0", "the kubelet probes the pod IP"
    assert probe.get("host") is None
    assert sidecar["startupProbe"]["failureThreshold"] * sidecar["startupProbe"]["periodSeconds"] >= 60
    liveness = sidecar["livenessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert _resolve_port(sidecar, liveness["port"]) == resolved.admin_listen.port
    # The metadata server itself stays on loopback: only this pod's containers reach it.
    assert all(a.host == "127.0.0.1" for a in resolved.listen)
    assert "127.0.0.1:8988" in [str(a) for a in resolved.listen]
    if doc["kind"] in ("Job", "CronJob"):
        assert pod["restartPolicy"] in ("Never", "OnFailure")


@pytest.mark.parametrize("item", POD_MANIFESTS, ids=_id)
def test_pod_security_is_restricted(item: tuple[Path, int, dict[str, Any]]) -> None:
    path, _, doc = item
    pod = _pod_spec(doc)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    assert pod["automountServiceAccountToken"] is False
    uid, gid = _docker_user()
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        if path.name == "iptables-init.yaml" and container["name"] == "imds-redirect":
            continue  # transparent mode's one-shot root NET_ADMIN step: tests/transparent/test_manifests.py
        own = container.get("securityContext", {})
        assert own["allowPrivilegeEscalation"] is False, container["name"]
        assert own["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert not own.get("privileged"), container["name"]
        assert _effective(pod, container, "runAsNonRoot") is True, container["name"]
        assert _effective(pod, container, "seccompProfile") == {"type": "RuntimeDefault"}, container["name"]
        assert _effective(pod, container, "runAsUser") not in (None, 0), container["name"]
        assert own.get("readOnlyRootFilesystem") is True, container["name"]
    (sidecar,) = [c for c in pod["initContainers"] if c["image"].startswith(BROKER_IMAGE)]
    own = sidecar["securityContext"]
    # Explicit on the container, so copying the sidecar into another pod keeps it; same ids as the image.
    assert (own["runAsNonRoot"], own["runAsUser"], own["runAsGroup"]) == (True, uid, gid)
    assert own["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = sidecar["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert set(resources["limits"]) == {"memory"}, "no CPU limit: throttling delays refreshes"


# k8s/azure/ pods get their subject token from Entra ID (workload identity), not from a
# projected Google-audience token; tests/azure/test_examples.py checks their wiring.
@pytest.mark.parametrize("item", [m for m in POD_MANIFESTS if "azure" not in m[0].parts], ids=_id)
def test_pod_wiring_token_credentials_and_hostaliases(item: tuple[Path, int, dict[str, Any]]) -> None:
    path, _, doc = item
    pod = _pod_spec(doc)
    (sidecar,) = [c for c in pod["initContainers"] if c["image"].startswith(BROKER_IMAGE)]
    cred_json = _configmap_credentials()
    # Placeholders filled: an unfilled PROJECT_NUMBER is (rightly) refused by the parser.
    cred = credconfig.parse(json.loads(_fill(cred_json)))
    assert isinstance(cred.source, credconfig.FileSource)
    token_path = PurePosixPath(cred.source.path)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}

    # The subject token: projected, audience = the provider, mounted where the credential file says.
    token_mount = mounts[str(token_path.parent)]
    assert "subPath" not in token_mount, "subPath mounts never see the kubelet's token rotation"
    (source,) = volumes[token_mount["name"]]["projected"]["sources"]
    sa_token = source["serviceAccountToken"]
    assert sa_token["path"] == token_path.name
    assert _fill(sa_token["audience"]) == "https:" + cred.audience
    assert 600 <= sa_token["expirationSeconds"] < 48 * 3600  # kubelet minimum; STS maximum

    # The credential file: the ConfigMap key, mounted where WIF_BROKER_CREDENTIALS points.
    cred_file = PurePosixPath(_env(sidecar)["WIF_BROKER_CREDENTIALS"])
    cred_mount = mounts[str(cred_file.parent)]
    assert volumes[cred_mount["name"]]["configMap"]["name"] == "wif-broker-credentials"
    assert (
        cred_file.name
        in yaml.safe_load((K8S / "credentials-configmap.yaml").read_text(encoding="utf-8"))["data"]
    )

    # The pod runs as the service account the Google principal names.
    assert pod["serviceAccountName"] == _only("ServiceAccount", pod["serviceAccountName"])["metadata"]["name"]

    # Only the broker sees the token and the credential file.
    for container in pod["containers"]:
        names = {m["name"] for m in container.get("volumeMounts", [])}
        assert not names & {token_mount["name"], cred_mount["name"]}, container["name"]
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in _env(container), "ADC would bypass the broker"

    aliases = {h: a["ip"] for a in pod["hostAliases"] for h in a["hostnames"]}
    # Transparent mode's iptables variant redirects 169.254.169.254, and Go's DNS probe wants exactly that.
    expected = "169.254.169.254" if path.name == "iptables-init.yaml" else "127.0.0.1"
    assert aliases["metadata.google.internal"] == expected


@pytest.mark.parametrize("item", [m for m in POD_MANIFESTS if "transparent" not in m[0].parts], ids=_id)
def test_app_containers_get_the_env_bundle(item: tuple[Path, int, dict[str, Any]], tmp_path: Path) -> None:
    _, _, doc = item
    pod = _pod_spec(doc)
    (sidecar,) = [c for c in pod["initContainers"] if c["image"].startswith(BROKER_IMAGE)]
    resolved = _broker_settings(sidecar, _configmap_credentials(), tmp_path)
    expected = envbundle.bundle(resolved.listen[0])
    assert set(expected) >= {
        "GCE_METADATA_HOST",
        "GCE_METADATA_IP",
        "GCE_METADATA_ROOT",
        "METADATA_EMULATOR_HOST",
        "NO_PROXY",
    }
    for lower, upper in BUNDLE_LOWER.items():
        expected.setdefault(lower, expected[upper])
    assert expected["GCE_METADATA_HOST"] == "127.0.0.1:8988"
    for container in pod["containers"]:
        env = _env(container)
        assert {k: env.get(k) for k in expected} == expected, container["name"]


def test_transparent_building_block_binds_port_80_unprivileged(tmp_path: Path) -> None:
    pod = _only("Pod", "app-transparent")["spec"]
    sysctls = {s["name"]: s["value"] for s in pod["securityContext"]["sysctls"]}
    assert int(sysctls["net.ipv4.ip_unprivileged_port_start"]) <= 80
    (sidecar,) = [c for c in pod["initContainers"] if c["image"].startswith(BROKER_IMAGE)]
    assert "add" not in sidecar["securityContext"]["capabilities"], "no NET_BIND_SERVICE needed"
    resolved = _broker_settings(sidecar, _configmap_credentials(), tmp_path)
    assert "127.0.0.1:80" in [str(a) for a in resolved.listen]
    text = (K8S / "transparent" / "pod-port80.yaml").read_text(encoding="utf-8")
    assert text.startswith("# TRANSPARENT-MODE BUILDING BLOCK")


# --------------------------------------------------------------------------------------------
# config/


def _configmap_credentials() -> str:
    return str(_only("ConfigMap", "wif-broker-credentials")["data"]["credentials.json"])


def test_credentials_example_parses_and_matches_the_configmap() -> None:
    info = json.loads(CREDENTIALS_EXAMPLE.read_text(encoding="utf-8"))
    assert json.loads(_configmap_credentials()) == info
    with pytest.raises(ConfigError, match="audience: names project 'PROJECT_NUMBER'"):
        credconfig.parse(info)  # a copy-paste that forgot the placeholder fails at start-up
    filled = credconfig.parse(json.loads(_fill(CREDENTIALS_EXAMPLE.read_text(encoding="utf-8"))))
    assert isinstance(filled.source, credconfig.FileSource)
    assert filled.source.path in fileless.K8S_TOKEN_PATHS
    assert filled.service_account_email == _fill("app@PROJECT_ID.iam.gserviceaccount.com")
    assert filled.project_number == PLACEHOLDERS["PROJECT_NUMBER"]


def test_credentials_example_is_what_gcloud_writes(tmp_path: Path) -> None:
    info = json.loads(CREDENTIALS_EXAMPLE.read_text(encoding="utf-8"))
    written = gcloud_cred_config(
        tmp_path,
        info,
        "--credential-source-file=" + info["credential_source"]["file"],
        "--credential-source-type=" + info["credential_source"]["format"]["type"],
    )
    assert written == info


def test_toml_example_documents_every_setting_with_valid_values(tmp_path: Path) -> None:
    text = (CONFIG / "wif-broker.toml").read_text(encoding="utf-8")
    active = {k.replace("_", "-") for k in tomllib.loads(text)}
    assert active <= settings.NAMES
    # Every setting appears, commented out; uncommented, each key is known and its value well typed.
    uncommented = re.sub(r"(?m)^# ([a-z][a-z0-9_-]* = )", r"\1", text)
    documented = {k.replace("_", "-") for k in tomllib.loads(uncommented)}
    assert documented == settings.NAMES, (
        f"missing: {sorted(settings.NAMES - documented)}, unknown: {sorted(documented - settings.NAMES)}"
    )
    path = tmp_path / "all.toml"
    path.write_text(uncommented, encoding="utf-8")
    values = settings.collect({"config": str(path)}, environ={})
    for spec in settings.SPECS:
        if spec.default is not None:
            assert values[spec.name] == spec.default, f"{spec.name}: show the default"


# --------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_invariants() -> None:
    assert len(STAGES) >= 2, "multi-stage: build the venv, copy only the venv"
    for stage in STAGES:
        # Pinned by digest: a moving tag rebuilds onto whatever it points at that day.
        assert re.fullmatch(r"python:3\.1[12]-slim(-[a-z]+)?@sha256:[0-9a-f]{64}", stage.base), stage.base
    builders = {s.name for s in STAGES[:-1]}
    for copy in FINAL.all("COPY"):
        flags, _, _ = _copy_parts(copy.args)
        assert flags.get("from") in builders, "the final stage copies only from the build stage"
    # The final stage runs one step: deleting the base's installers (exec form, no shell).
    (strip,) = FINAL.all("RUN")
    argv = _run_argv(strip.args)
    assert strip.args.startswith("[")
    assert argv[0] in ("python", "python3")
    assert "rmtree" in argv[argv.index("-c") + 1]
    assert "pip" not in [PurePosixPath(a).name for a in argv], "nothing is installed in the final stage"
    assert not FINAL.all("ADD")
    uid, gid = _docker_user()
    assert uid > 0
    assert gid > 0
    assert [i.keyword for i in FINAL.instructions].index("USER") > max(
        n for n, i in enumerate(FINAL.instructions) if i.keyword in ("COPY", "RUN")
    )
    # OCI labels: the version the wheel carries, the revision passed at build time.
    args = {k: v for i in FINAL.all("ARG") for k, _, v in [i.args.partition("=")]}
    assert args["VERSION"] == broker.__version__
    assert "REVISION" in args
    labels = " ".join(i.args for i in FINAL.all("LABEL"))
    for key, value in (("version", "${VERSION}"), ("revision", "${REVISION}"), ("source", "${SOURCE}")):
        assert f'org.opencontainers.image.{key}="{value}"' in labels, key
    # Third-party code comes only from the hash-locked files, wheels only; the product's own
    # wheel is built from the checkout with no index at all.
    installs = [a for s in STAGES[:-1] for i in s.all("RUN") for a in [_run_argv(i.args)] if "install" in a]
    locked = [a for a in installs if "-r" in a]
    assert {a[a.index("-r") + 1] for a in locked} == {
        "/src/requirements/build.txt",
        "/src/requirements/runtime.txt",
    }
    for argv in locked:
        assert {"--require-hashes", "--no-deps", "--only-binary"} <= set(argv), argv
    for argv in installs:
        assert argv in locked or {"--no-deps", "--no-index"} <= set(argv), argv
    venvs = [a for s in STAGES[:-1] for i in s.all("RUN") for a in [_run_argv(i.args)] if "venv" in a]
    assert ["python3", "-m", "venv", "--without-pip", "/opt/wif-broker"] in venvs, "no pip in the venv"
    env = {k: v for i in FINAL.all("ENV") for k, v in _env_pairs(i.args).items()}
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    (entrypoint,) = FINAL.all("ENTRYPOINT")
    assert _exec_form(entrypoint.args) == ["wif-broker"]
    (cmd,) = FINAL.all("CMD")
    assert _exec_form(cmd.args) == ["run"]
    exposed = {p.split("/")[0] for i in FINAL.all("EXPOSE") for p in i.args.split()}
    assert exposed == {"8988", "8989"}
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"(?im)^\s*ADD\s+(--\S+\s+)*https?://", text)
    assert not re.search(r"(?i)\b(curl|wget)\b", "\n".join(_logical_lines(text)))
    # A `# syntax=` directive makes BuildKit pull its frontend from a registry.
    assert not re.search(r"(?im)^#\s*syntax\s*=", text)


def _healthcheck_argv() -> list[str]:
    (healthcheck,) = FINAL.all("HEALTHCHECK")
    form = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(\[.*\])", healthcheck.args)
    assert form, "HEALTHCHECK [OPTIONS] CMD [...] (exec form: no shell)"
    argv = _exec_form(form.group(1))
    assert PurePosixPath(argv[0]).name not in ("sh", "bash", "curl", "wget")
    assert "http://127.0.0.1:8989/healthz" in argv[-1]
    return argv


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/healthz" else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_healthcheck_command_needs_no_shell_and_ignores_proxies() -> None:
    argv = _healthcheck_argv()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        # A dead proxy: the check must not go through one (a proxy hop breaks loopback checks).
        env = {"PATH": os.defpath, "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}

        def run(url: str) -> int:
            command = [sys.executable, *argv[1:-1], argv[-1].replace("http://127.0.0.1:8989/healthz", url)]
            return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

        assert run(base + "/healthz") == 0
        assert run(base + "/readyz") != 0  # 503 -> unhealthy
        server.shutdown()
        server.server_close()
        assert run(base + "/healthz") != 0  # nothing listening -> unhealthy
    finally:
        server.shutdown()
        server.server_close()


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    patterns = _ignore_patterns()
    for stage in STAGES:
        for copy in stage.all("COPY"):
            flags, sources, _ = _copy_parts(copy.args)
            if "from" in flags:
                continue
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not dockerignored(source, patterns), f"{source} is COPYed but .dockerignore drops it"
    for path in (
        ".git",
        ".venv",
        "tests/test_packaging.py",
        "k8s/deployment.yaml",
        "broker/__pycache__/x.pyc",
    ):
        assert dockerignored(path, patterns), path
    assert not dockerignored("broker/fakes/sts.py", patterns)


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_dockerfile_install_steps_work_in_a_clean_venv(tmp_path: Path) -> None:
    """SLOW (~30-60 s): replay the build stage's COPY/RUN lines, then run the image's entrypoint.

    Container paths are re-rooted under tmp_path; ``python`` is this interpreter.
    The RUN lines are taken from the Dockerfile, so the test and the image run
    the same ``pip install`` (with dependencies; pip's own cache is used).
    """
    root = tmp_path / "root"
    root.mkdir()

    def reroot(path: str) -> str:
        return str(root / path.lstrip("/")) if path.startswith("/") else path

    patterns = _ignore_patterns()
    base_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "GOOGLE_APPLICATION_CREDENTIALS")
        and not k.startswith(settings.ENV_PREFIX)
    }
    base_env["PATH"] = os.pathsep.join(
        p for p in base_env.get("PATH", os.defpath).split(os.pathsep) if not p.startswith(str(ROOT))
    )
    (build,) = [s for s in STAGES if s.name != FINAL.name and any(i.keyword == "RUN" for i in s.instructions)]
    env = dict(base_env)
    workdir = root
    ran = []
    for step in build.instructions:
        if step.keyword == "ENV":
            env.update(_env_pairs(step.args))
        elif step.keyword == "WORKDIR":
            workdir = Path(reroot(step.args))
            workdir.mkdir(parents=True, exist_ok=True)
        elif step.keyword == "COPY":
            flags, sources, dest = _copy_parts(step.args)
            assert "from" not in flags
            target = Path(reroot(dest) if dest.startswith("/") else workdir / dest)
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    for file in src.rglob("*"):
                        rel = file.relative_to(ROOT).as_posix()
                        if file.is_file() and not dockerignored(rel, patterns):
                            out = target / file.relative_to(src)
                            out.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(file, out)
                else:
                    out = target / src.name if dest.endswith("/") or len(sources) > 1 else target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, out)
        elif step.keyword == "RUN":
            argv = [reroot(a) for a in _run_argv(step.args)]
            if argv[0] in ("python", "python3"):
                argv[0] = sys.executable
            ran.append(argv)
            result = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{argv}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        else:
            assert step.keyword in ("ARG", "LABEL"), f"replay does not know {step.keyword}"
    assert any("--require-hashes" in argv and argv[-1].endswith("runtime.txt") for argv in ran), "locked"

    # The runtime stage: only the copied venv, the image's ENV, the ENTRYPOINT.
    runtime_env = {"HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
    for step in FINAL.all("ENV"):
        for key, value in _env_pairs(step.args).items():
            value = value.replace("$PATH", "/usr/local/bin:/usr/bin:/bin")
            runtime_env[key] = ":".join(reroot(p) if p.startswith("/opt/") else p for p in value.split(":"))
    copied = [reroot(src) for i in FINAL.all("COPY") for src in _copy_parts(i.args)[1]]
    (entrypoint,) = [_exec_form(i.args) for i in FINAL.all("ENTRYPOINT")]
    program = shutil.which(entrypoint[0], path=runtime_env["PATH"])
    assert program is not None
    assert any(program.startswith(c + "/") for c in copied), program
    venv_python = str(Path(program).parent / "python")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # The installed copy, not this checkout; dependencies installed and consistent.
    where = subprocess.run(
        [venv_python, "-c", "import broker; print(broker.__file__)"],
        cwd=cwd,
        env=runtime_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(root))
    # Consistent (the build stage's own `pip check`, replayed above), and no pip in the venv.
    assert any(argv[-1] == "check" for argv in ran)
    no_pip = subprocess.run([venv_python, "-c", "import pip"], cwd=cwd, env=runtime_env, capture_output=True)
    assert no_pip.returncode != 0, "pip is importable in the runtime venv"
    before = {c: _tree(Path(c)) for c in copied}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [program, *args], cwd=cwd, env=runtime_env, capture_output=True, text=True, timeout=120
        )

    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"wif-broker {broker.__version__}"
    bundle = run("env", "--format", "sh")
    assert bundle.returncode == 0, bundle.stderr
    assert bundle.stdout == envbundle.render(settings.Address("127.0.0.1", 8988), "sh")
    # The image's default command without credentials: one line, exit 2.
    (cmd,) = [_exec_form(i.args) for i in FINAL.all("CMD")]
    unconfigured = run(*cmd)
    assert unconfigured.returncode == 2
    assert unconfigured.stderr.count("\n") == 1, unconfigured.stderr
    assert "credentials" in unconfigured.stderr
    # Nothing was written at run time (read-only root filesystem).
    assert {c: _tree(Path(c)) for c in copied} == before
    assert not any(cwd.iterdir())

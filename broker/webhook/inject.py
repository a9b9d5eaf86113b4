"""What a pod gets (SPEC §9): pure functions from pod + ServiceAccount annotations to a decision.

No aiohttp, no Kubernetes client: the server reads the ServiceAccount and calls
:func:`decide`; tests and ``k8s/`` drift checks call it directly. The pod stays raw
JSON on purpose: a JSONPatch addresses the object exactly as the API server sent it,
and a dataclass would drop the fields this module does not know.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.envbundle import bundle
from broker.metrics import Admission
from broker.settings import Address
from broker.webhook.settings import PROJECT_ID, WebhookSettings, audience_problem, default_token_audience

SIDECAR = "wif-broker"
VOLUME = "wif-broker-token"
TOKEN_DIR = "/var/run/secrets/wif-broker"
LISTEN = Address("127.0.0.1", 8988)
ADMIN_PORT = 8989
METADATA_HOST = "metadata.google.internal"

GKE_ANNOTATION = "iam.gke.io/gcp-service-account"
INJECT = "wif-broker.io/inject"
AUDIENCE = "wif-broker.io/audience"
PROJECT = "wif-broker.io/project-id"
SKIP = "wif-broker.io/skip-containers"

# GKE accepts any Google service-account email; the project id is derivable only from
# the NAME@PROJECT.iam.gserviceaccount.com form (broker/settings.py does the same).
_EMAIL = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}@[a-z0-9][a-z0-9.-]{0,200}\.gserviceaccount\.com$")
_EMAIL_PROJECT = re.compile(r"^[^@]+@([a-z][a-z0-9-]{4,28}[a-z0-9])\.iam\.gserviceaccount\.com$")

Pod = Mapping[str, Any]  # the raw Pod JSON of the AdmissionReview
Op = dict[str, Any]  # one RFC 6902 operation


Outcome = Admission  # label values of wif_broker_webhook_admissions_total


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    patch: tuple[Op, ...] = ()
    message: str = ""  # for a refusal: the object and the fix

    @property
    def allowed(self) -> bool:
        return self.outcome is not Outcome.REFUSED


def describe(pod: Pod, namespace: str) -> str:
    """``pod NS/NAME``, or ``pod NS/PREFIX*`` for a Deployment's or Job's pod, which
    has only ``generateName`` when it is admitted."""
    meta = pod.get("metadata") or {}
    name = meta.get("name") or (str(meta.get("generateName") or "") + "*")
    return f"pod {namespace}/{name}"


def precheck(pod: Pod) -> Decision | None:
    """The decisions that need no ServiceAccount read (saves the API call)."""
    if _pod_annotations(pod).get(INJECT) == "false":
        return Decision(Outcome.OPTED_OUT)
    spec = pod.get("spec") or {}
    if any(c.get("name") == SIDECAR for c in spec.get("initContainers") or ()):
        return Decision(Outcome.ALREADY_INJECTED)  # re-invocation: idempotent
    return None


def decide(
    pod: Pod, namespace: str, sa_name: str, sa_annotations: Mapping[str, str], cfg: WebhookSettings
) -> Decision:
    """Inject, skip, or refuse a pod whose ServiceAccount carries ``sa_annotations``."""
    early = precheck(pod)
    if early is not None:
        return early
    email = sa_annotations.get(GKE_ANNOTATION)
    direct = sa_annotations.get(INJECT) == "true"
    if (email is None and not direct) or sa_annotations.get(INJECT) == "false":
        return Decision(Outcome.NOT_OPTED_IN)
    who, sa = describe(pod, namespace), f"ServiceAccount {namespace}/{sa_name}"

    def refuse(problem: str, fix: str) -> Decision:
        return Decision(Outcome.REFUSED, message=f"wif-broker: {who}: {problem}; fix: {fix}")

    if email is not None and not _EMAIL.match(email):
        return refuse(
            f"{sa} annotation {GKE_ANNOTATION}={email!r} is not a Google service-account email",
            f'set it to NAME@PROJECT.iam.gserviceaccount.com, or remove it and set {INJECT}: "true" '
            "for direct federated access",
        )
    if (pod.get("spec") or {}).get("hostNetwork"):
        return refuse(
            "uses hostNetwork, so a loopback metadata server would serve every process on the node",
            f'run the pod without hostNetwork, or annotate it {INJECT}: "false"',
        )
    audience = sa_annotations.get(AUDIENCE) or cfg.audience
    if not audience:
        return refuse(
            "no workload identity provider audience",
            f"annotate the {sa} with {AUDIENCE}: //iam.googleapis.com/projects/NUMBER/locations/global/"
            "workloadIdentityPools/POOL/providers/PROVIDER, or install the webhook with an audience",
        )
    problem = audience_problem(audience)
    if problem:
        source = f"{sa} annotation {AUDIENCE}" if sa_annotations.get(AUDIENCE) else "the webhook's audience"
        return refuse(f"{source} {audience!r}: {problem}", "use the provider's full resource name //iam…")
    project = ""
    if email is None or not _EMAIL_PROJECT.match(email):
        project = sa_annotations.get(PROJECT) or cfg.project_id
        if not project:
            return refuse(
                f"{sa} has no project for {'direct federated access' if email is None else email}",
                f"annotate the ServiceAccount {PROJECT}: PROJECT_ID, or give the webhook a project-id",
            )
        if not PROJECT_ID.match(project):  # the webhook's own project-id was checked at start-up
            return refuse(f"{sa} annotation {PROJECT}={project!r} is not a project id", "use the project ID")
    token_audience = (
        default_token_audience(audience) if sa_annotations.get(AUDIENCE) else cfg.token_audience
    ) or default_token_audience(audience)
    skip = {n.strip() for n in _pod_annotations(pod).get(SKIP, "").split(",") if n.strip()}
    sidecar = sidecar_container(cfg.sidecar_image, _args(audience, email, project, cfg.sidecar_args))
    try:
        ops = _patch(pod, sidecar, token_audience, skip)
    except ValueError as exc:
        return refuse(str(exc), f'rename or move it, or annotate the pod {INJECT}: "false"')
    return Decision(Outcome.INJECTED, tuple(ops))


def _pod_annotations(pod: Pod) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("annotations") or {}


def _args(audience: str, email: str | None, project: str, extra: Sequence[str]) -> list[str]:
    # "--flag=value": a value can never be mistaken for a flag.
    args = ["run", f"--audience={audience}"]
    if email is not None:
        args.append(f"--service-account={email}")
    if project:
        args.append(f"--project-id={project}")
    args += [f"--source=file:{TOKEN_DIR}/token", f"--listen={LISTEN}", f"--admin-listen=0.0.0.0:{ADMIN_PORT}"]
    return [*args, *extra]


def sidecar_container(image: str, args: list[str]) -> dict[str, Any]:
    """The native sidecar; probes, resources and security context as in k8s/deployment.yaml."""
    probe = {"timeoutSeconds": 2}
    return {
        "name": SIDECAR,
        "image": image,
        "restartPolicy": "Always",  # native sidecar: ordered start, does not hold a Job open
        "args": args,
        # Named after the container, so an app Service's targetPort ("admin", "http")
        # can never resolve to the sidecar.
        "ports": [{"name": SIDECAR, "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        # Passes once the first token is minted: the app containers start after it.
        "startupProbe": {
            **probe,
            "httpGet": {"path": "/readyz", "port": SIDECAR},
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        "livenessProbe": {
            **probe,
            "httpGet": {"path": "/healthz", "port": SIDECAR},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}],
    }


def token_volume(token_audience: str) -> dict[str, Any]:
    return {
        "name": VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "path": "token",
                        "audience": token_audience,
                        "expirationSeconds": 3600,
                    }
                }
            ]
        },
    }


def _merge_no_proxy(current: str, ours: str) -> str:
    have = [item.strip() for item in current.split(",") if item.strip()]
    return ",".join(have + [item for item in ours.split(",") if item not in have])


def _env_ops(path: str, container: Mapping[str, Any]) -> list[Op]:
    wanted = bundle(LISTEN)
    env = container.get("env")
    if not env:
        return [
            {
                "op": "add",
                "path": f"{path}/env",
                "value": [{"name": k, "value": v} for k, v in wanted.items()],
            }
        ]
    ops: list[Op] = []
    names = {item.get("name"): i for i, item in enumerate(env)}
    # A proxy exemption the app already has stays in force in both spellings (curl reads
    # no_proxy first, Python NO_PROXY): each variant is the app's list plus the broker's.
    own = [
        env[names[k]]["value"] for k in ("NO_PROXY", "no_proxy") if k in names and "value" in env[names[k]]
    ]
    for key, value in wanted.items():
        if key in ("NO_PROXY", "no_proxy"):
            value = _merge_no_proxy(own[0], value) if own else value
        if key not in names:
            ops.append({"op": "add", "path": f"{path}/env/-", "value": {"name": key, "value": value}})
        elif key.lower() == "no_proxy" and "value" in env[names[key]]:
            merged = _merge_no_proxy(str(env[names[key]]["value"]), wanted[key])
            if merged != env[names[key]]["value"]:
                ops.append({"op": "replace", "path": f"{path}/env/{names[key]}/value", "value": merged})
    return ops


def _patch(pod: Pod, sidecar: dict[str, Any], token_audience: str, skip: set[str]) -> list[Op]:
    """Ops in an order where every index refers to the pod as admitted: the sidecar
    goes in last, at position 0 of initContainers."""
    spec = pod.get("spec") or {}
    ops: list[Op] = []
    for field in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(field) or ()):
            if container.get("name") not in skip:
                ops += _env_ops(f"/spec/{field}/{index}", container)
    if any(c.get("name") == SIDECAR for c in spec.get("containers") or ()):
        raise ValueError(f"already has a container named {SIDECAR!r}")  # names are unique per pod
    for container in [*(spec.get("initContainers") or ()), *(spec.get("containers") or ())]:
        for port in container.get("ports") or ():
            if (
                port.get("containerPort") in (LISTEN.port, ADMIN_PORT)
                and port.get("protocol", "TCP") == "TCP"
            ):
                # One network namespace: the sidecar could not bind and the pod would hang in Init.
                raise ValueError(
                    f"container {container.get('name')!r} uses port {port['containerPort']}, "
                    f"which the sidecar needs ({LISTEN.port} and {ADMIN_PORT})"
                )
    volumes = spec.get("volumes")
    if any(v.get("name") == VOLUME for v in volumes or ()):
        raise ValueError(f"already has a volume named {VOLUME!r}")
    if volumes:
        ops.append({"op": "add", "path": "/spec/volumes/-", "value": token_volume(token_audience)})
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": [token_volume(token_audience)]})
    aliases = spec.get("hostAliases")
    if not any(METADATA_HOST in (a.get("hostnames") or ()) for a in aliases or ()):
        alias = {"ip": "127.0.0.1", "hostnames": [METADATA_HOST]}
        if aliases:
            ops.append({"op": "add", "path": "/spec/hostAliases/-", "value": alias})
        else:
            ops.append({"op": "add", "path": "/spec/hostAliases", "value": [alias]})
    if spec.get("initContainers"):
        ops.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    return ops

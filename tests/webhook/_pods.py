"""Pods and AdmissionReviews as the API server sends them to a mutating webhook.

By the time a webhook sees a pod, the built-in admission plugins and defaulting
have run: a ReplicaSet's or Job's pod has ``generateName`` and no name, the
ServiceAccount plugin has added the ``kube-api-access-*`` volume and its mounts, and
every container carries its defaults. The builders reproduce that shape.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

IMAGE = "registry.example/wif-broker:0.1.0"
AUDIENCE = (
    "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/pool/providers/k8s"
)
SA_EMAIL = "app@my-project.iam.gserviceaccount.com"


def _container(name: str, image: str = "registry.example/app:1", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "volumeMounts": [
            {
                "name": "kube-api-access-x7k2p",
                "readOnly": True,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            }
        ],
        **extra,
    }


def _api_access_volume() -> dict[str, Any]:
    return {
        "name": "kube-api-access-x7k2p",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
            "defaultMode": 420,
        },
    }


def deployment_pod(sa: str = "app", *, namespace: str = "team-a", **spec: Any) -> dict[str, Any]:
    """A ReplicaSet controller's pod: generateName, no name, owner reference."""
    pod: dict[str, Any] = {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "app-7d9f8b6c5d-",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "app", "pod-template-hash": "7d9f8b6c5d"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "app-7d9f8b6c5d",
                    "uid": str(uuid.uuid4()),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "volumes": [_api_access_volume()],
            "containers": [_container("app")],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": sa,
            "serviceAccount": sa,
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                }
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {},
    }
    pod["spec"].update(spec)
    return pod


def job_pod(sa: str = "app", *, namespace: str = "team-a") -> dict[str, Any]:
    """A Job controller's pod: restartPolicy Never, batch labels."""
    pod = deployment_pod(sa, namespace=namespace, restartPolicy="Never")
    pod["metadata"]["generateName"] = "report-28940310-"
    pod["metadata"]["labels"] = {
        "batch.kubernetes.io/job-name": "report-28940310",
        "job-name": "report-28940310",
    }
    pod["metadata"]["ownerReferences"][0].update(kind="Job", apiVersion="batch/v1", name="report-28940310")
    return pod


def with_containers(pod: dict[str, Any], *names: str, init: tuple[str, ...] = ()) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["spec"]["containers"] = [_container(n) for n in names]
    if init:
        pod["spec"]["initContainers"] = [_container(n) for n in init]
    return pod


def review(pod: dict[str, Any], *, namespace: str = "team-a", operation: str = "CREATE") -> dict[str, Any]:
    """The AdmissionReview v1 the API server posts for a pod."""
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "kind": gvk,
        "resource": gvr,
        "requestKind": gvk,
        "requestResource": gvr,
        "namespace": namespace,
        "operation": operation,
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": str(uuid.uuid4()),
            "groups": [
                "system:serviceaccounts",
                "system:serviceaccounts:kube-system",
                "system:authenticated",
            ],
        },
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
    }
    if pod["metadata"].get("name"):
        request["name"] = pod["metadata"]["name"]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}

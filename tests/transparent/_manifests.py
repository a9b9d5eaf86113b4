"""Reading k8s/transparent/: the pods, the broker sidecar, the redirect rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TRANSPARENT = ROOT / "k8s" / "transparent"
BROKER_IMAGE = "ghcr.io/example/wif-broker:"
REDIRECT_CONTAINER = "imds-redirect"


def documents(name: str) -> list[dict[str, Any]]:
    text = (TRANSPARENT / name).read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def pod(name: str) -> dict[str, Any]:
    (doc,) = [d for d in documents(name) if d["kind"] == "Pod"]
    return doc


def broker_container(doc: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in doc["spec"]["initContainers"] if c["image"].startswith(BROKER_IMAGE)]
    return sidecar


def redirect_container(doc: dict[str, Any]) -> dict[str, Any]:
    (init,) = [c for c in doc["spec"]["initContainers"] if c["name"] == REDIRECT_CONTAINER]
    return init


def iptables_rule(doc: dict[str, Any]) -> list[str]:
    """The redirect init container's argv (``iptables -t nat -A OUTPUT …``), as a string list."""
    init = redirect_container(doc)
    return [str(word) for word in [*init.get("command", []), *init.get("args", [])]]

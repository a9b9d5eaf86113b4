"""The metadata directory as data, and its renderings. Pure: no aiohttp, no tokens.

Formats follow the real GCE server (reference/metadata-protocol.md §3): leaves
are raw text with no trailing newline, listings one entry per line with ``/``
after sub-directories, ``?recursive=true`` is JSON with camelCase keys for the
fixed schema (dynamic keys such as account emails are kept verbatim).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.settings import Settings

Value = str | int | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Dir:
    children: Mapping[str, Dir | Value] = field(default_factory=dict)
    dynamic: bool = False  # keys are data (emails, attribute names), not schema names
    virtual: tuple[str, ...] = ()  # listed, but served by handlers (token, identity)


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    content_type: str

    @property
    def etag(self) -> str:
        # Real ETags are ~16 lowercase hex digits, unquoted (metadata-protocol.md §3.3).
        return hashlib.sha256(self.body).hexdigest()[:16]


class BadQuery(ValueError):
    """The query does not fit the node, e.g. ``?alt=json`` on a directory (400)."""


TEXT = "application/text"
JSON = "application/json"


def build_tree(settings: Settings) -> Dir:
    account = Dir(
        {"aliases": ("default",), "email": settings.email, "scopes": settings.scopes.scopes},
        virtual=("identity", "token"),
    )
    instance: dict[str, Dir | Value] = {
        "attributes": Dir(dynamic=True),
        "hostname": settings.instance_name,
        "id": int(settings.instance_id),
        "name": settings.instance_name,
        "service-accounts": Dir({"default": account, settings.email: account}, dynamic=True),
    }
    if settings.zone:
        instance["zone"] = f"projects/{settings.numeric_project_id}/zones/{settings.zone}"
    return Dir(
        {
            "instance": Dir(instance),
            "project": Dir(
                {
                    "attributes": Dir(dynamic=True),
                    "numeric-project-id": int(settings.numeric_project_id),
                    "project-id": settings.project_id,
                }
            ),
            "universe": Dir({"universe-domain": settings.cred.universe_domain}),
        }
    )


def resolve(root: Dir, segments: list[str]) -> Dir | Value | None:
    node: Dir | Value = root
    for segment in segments:
        if not isinstance(node, Dir) or segment not in node.children:
            return None
        node = node.children[segment]
    return node


def render(node: Dir | Value, *, alt: str | None, recursive: bool) -> Rendered:
    if alt not in (None, "json", "text"):
        raise BadQuery(f"alt must be json or text, not {alt!r}")
    if isinstance(node, Dir):
        if recursive:
            if alt == "text":
                lines = "".join(f"{path} {_text(value)}\n" for path, value in _flatten(node, ""))
                return Rendered(lines.encode(), TEXT)
            return Rendered(_dumps(_to_json(node)), JSON)
        if alt is not None:
            raise BadQuery("alt is only valid on a value or with recursive=true")
        return Rendered(listing(node).encode(), TEXT)
    if alt == "json":
        return Rendered(_dumps(list(node) if isinstance(node, tuple) else node), JSON)
    return Rendered(_text(node).encode(), TEXT)


def listing(node: Dir) -> str:
    names = [name + "/" if isinstance(child, Dir) else name for name, child in node.children.items()]
    return "".join(f"{name}\n" for name in sorted([*names, *node.virtual]))


def _text(value: Value) -> str:
    if isinstance(value, tuple):
        return "".join(f"{item}\n" for item in value)  # list leaves: one item per line
    return str(value)


def _camel(name: str) -> str:
    head, *rest = name.split("-")
    return head + "".join(part.capitalize() for part in rest)


def _to_json(node: Dir | Value) -> Any:
    if isinstance(node, tuple):
        return list(node)
    if not isinstance(node, Dir):
        return node
    return {
        (key if node.dynamic else _camel(key)): _to_json(child)
        for key, child in sorted(node.children.items())
    }


def _flatten(node: Dir, prefix: str) -> list[tuple[str, Value]]:
    out: list[tuple[str, Value]] = []
    for key, child in sorted(node.children.items()):
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(child, Dir):
            out.extend(_flatten(child, path))
        else:
            out.append((path, child))
    return out


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()

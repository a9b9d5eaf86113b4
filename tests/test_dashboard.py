"""The shipped Grafana dashboard queries only metrics the broker exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from broker import metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_info")


def exported_names() -> set[str]:
    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_panel_queries_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names() | {"up"}
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried.update(re.findall(r"\b((?:wif_broker|process)_[a-z_]+)\b", target["expr"]))
    assert queried, "the dashboard has no wif_broker queries"
    missing = {
        name for name in queried if name not in exported and name.removesuffix("_bucket") not in exported
    }
    assert not missing, f"dashboard queries metrics the broker does not export: {sorted(missing)}"
    # Every broker metric family is on the dashboard somewhere.
    families = {f.name for f in metrics.REGISTRY.collect() if f.name.startswith("wif_broker_")}
    shown = {n for n in queried if n.startswith("wif_broker_")}
    unshown = {
        f for f in families if not any(s == f or s.startswith(f + "_") or f.startswith(s) for s in shown)
    }
    assert not unshown, f"metrics missing from the dashboard: {sorted(unshown)}"

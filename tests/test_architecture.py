"""Import contract: dependencies point one way (style-and-architecture.md, house rule 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests import pyast

ROOT = Path(__file__).resolve().parent.parent / "broker"


def imports_of(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(pyast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules(pattern: str) -> list[Path]:
    found = sorted(ROOT.glob(pattern))
    assert found, pattern
    return found


FORBIDDEN = [
    # The cache is generic: no HTTP, no Google, no knowledge of the chain.
    ("cache.py", ("aiohttp", "google", "broker.sts", "broker.iam", "broker.sources", "broker.metadata")),
    # The metadata layer knows tokens and the chain façade, not where tokens come from.
    ("metadata/*.py", ("broker.sources", "broker.sts", "broker.iam", "botocore", "boto3", "azure")),
    ("admin.py", ("broker.sources", "broker.sts", "broker.iam", "broker.metadata")),
    # Upstream calls do not reach back up the stack.
    ("sts.py", ("broker.chain", "broker.metadata", "broker.cache", "broker.daemon")),
    ("iam.py", ("broker.chain", "broker.metadata", "broker.cache", "broker.daemon")),
    ("sources/*.py", ("broker.chain", "broker.metadata", "broker.cache", "broker.daemon", "broker.sts")),
    # The Extensions API client is a protocol client only; the extension drives the daemon,
    # never the layers under it.
    ("lambda_api.py", ("broker.chain", "broker.cache", "broker.metadata", "broker.daemon", "broker.sources")),
    ("lambda_ext.py", ("broker.metadata", "broker.sources", "broker.sts", "broker.iam", "broker.webhook")),
    # The webhook decides and patches; it never runs the token chain.
    ("webhook/*.py", ("broker.chain", "broker.cache", "broker.sources", "broker.sts", "broker.iam")),
    # Leaves.
    ("metrics.py", ("broker.chain", "broker.cache", "broker.metadata", "broker.settings")),
    ("logs.py", ("broker.chain", "broker.cache", "broker.metadata", "broker.settings", "broker.metrics")),
    ("tokens.py", ("aiohttp", "broker.")),
    ("clock.py", ("aiohttp", "broker.")),
]


@pytest.mark.parametrize(("pattern", "forbidden"), FORBIDDEN, ids=[p for p, _ in FORBIDDEN])
def test_imports_point_one_way(pattern: str, forbidden: tuple[str, ...]) -> None:
    for module in modules(pattern):
        bad = sorted(n for n in imports_of(module) if any(n == f or n.startswith(f) for f in forbidden))
        assert not bad, f"{module.relative_to(ROOT)} imports {bad}"


def test_no_time_reads_outside_the_clock() -> None:
    # Token expiries use the injected Clock so tests can drive time; durations
    # for latency metrics may use perf_counter.
    for module in ROOT.rglob("*.py"):
        if module.name == "clock.py" or "fakes" in module.parts:
            continue
        text = module.read_text()
        assert "time.time()" not in text, module
        assert "time.monotonic()" not in text, module


def test_modules_stay_small() -> None:
    for module in ROOT.rglob("*.py"):
        lines = len(module.read_text().splitlines())
        assert lines <= 330, f"{module.relative_to(ROOT)} has {lines} lines; split it by concern"

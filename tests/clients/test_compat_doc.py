"""docs/compatibility.md cannot drift: its table is generated from tests/clients/compat.py.

Fix a failure here with ``python -m tests.clients.compat --write`` after adding
the missing test ids to ``compat.rows()``.
"""

from __future__ import annotations

import json

from tests.clients import compat


def listed() -> list[str]:
    return [test_id for row in compat.rows() for test_id in (*row.env, *row.transparent)]


def test_every_client_test_is_in_the_table() -> None:
    missing = sorted(compat.existing_tests(client_only=True) - set(listed()))
    assert not missing, f"client tests missing from tests/clients/compat.py rows(): {missing}"


def test_every_test_in_the_table_exists() -> None:
    unknown = sorted(set(listed()) - compat.existing_tests(client_only=False))
    assert not unknown, f"compat rows name tests that do not exist: {unknown}"


def test_no_env_test_is_listed_twice() -> None:
    # A transparent-mode scenario runs several clients at once, so its ids repeat.
    ids = [test_id for row in compat.rows() for test_id in row.env]
    assert sorted({i for i in ids if ids.count(i) > 1}) == []


def test_doc_table_is_generated_from_the_rows() -> None:
    for path in (compat.DOC, compat.README):
        assert compat.doc_table(path.read_text()) == compat.render(), (
            f"{path.name} is stale: run `python -m tests.clients.compat --write`"
        )


def test_node_versions_in_the_table_are_the_pinned_ones() -> None:
    lock = json.loads((compat.NODE_PACKAGE.parent / "package-lock.json").read_text())
    for package in ("gcp-metadata", "google-auth-library"):
        locked = lock["packages"][f"node_modules/{package}"]["version"]
        assert f"{locked} (npm, pinned)" in compat.render(), package


def test_results_are_merged_per_test_function() -> None:
    compat._outcomes.clear()
    try:
        for nodeid, outcome in [
            ("tests/clients/test_x.py::test_a[one]", "passed"),
            ("tests/clients/test_x.py::test_a[two]", "failed"),
            ("tests/clients/test_x.py::test_a[three]", "passed"),
            ("tests/clients/test_x.py::test_b", "skipped"),
        ]:
            compat.pytest_runtest_logreport(FakeReport(nodeid, "call", outcome))
        compat.pytest_runtest_logreport(FakeReport("tests/clients/test_x.py::test_c", "setup", "passed"))
        assert compat._outcomes == {
            "tests/clients/test_x.py::test_a": "failed",
            "tests/clients/test_x.py::test_b": "skipped",
        }
    finally:
        compat._outcomes.clear()


class FakeReport:
    def __init__(self, nodeid: str, when: str, outcome: str) -> None:
        self.nodeid, self.when, self.outcome = nodeid, when, outcome

"""Each upstream call is timed and counted once, by the chain's steps (broker/steps.py).

Before the steps were shared, the Azure source timed its own ``get_token`` and
the chain timed the same call again under ``subject_token``: two counts for one
call. The subject-token call of the aws/azure sources is the call to that cloud,
so it is counted under that upstream, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from broker import metrics, settings
from broker.fakes import FakeGoogle
from tests.azure.test_failures import answer, fakes, fileless, setenv
from tests.conftest import run_broker
from tests.test_diagnosis import token_error

UPSTREAMS = ("subject_token", "sts", "iam", "azure", "aws")


def counts() -> dict[str, float]:
    return {
        upstream: sum(
            metrics.REGISTRY.get_sample_value(
                "wif_broker_upstream_requests_total", {"upstream": upstream, "outcome": outcome}
            )
            or 0.0
            for outcome in ("ok", "transient", "denied")
        )
        for upstream in UPSTREAMS
    }


def delta(before: dict[str, float]) -> dict[str, float]:
    after = counts()
    return {key: after[key] - before[key] for key in UPSTREAMS if after[key] != before[key]}


async def test_file_source_one_count_per_call(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    before = counts()
    async with run_broker(make_settings()) as broker:
        status, _ = await token_error(broker.url)
    assert status == 200
    assert delta(before) == {"subject_token": 1, "sts": 1, "iam": 1}
    assert len(google.sts.calls) == 1
    assert len(google.iam.calls) == 1


async def test_azure_get_token_is_counted_once_as_azure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fakes() as (azure, google):
        setenv(monkeypatch, azure.workload_identity_env(tmp_path / "token"))
        before = counts()
        status, body = await answer(**fileless(google))
        assert status == 200, body
        assert delta(before) == {"azure": 1, "sts": 1, "iam": 1}

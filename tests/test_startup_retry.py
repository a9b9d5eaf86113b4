"""Start-up never deadlocks (SPEC §8): the pre-warm retries until the default token is minted.

The production daemon on a driven clock against the fakes; STS is down when the
broker starts (a pod's network still coming up). Nobody asks the broker for a
token: /readyz must turn 200 by itself once STS answers, and the pre-warm must
try at most 30 s apart meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from broker import metrics
from broker.clock import ManualClock
from broker.fakes import FakeGoogle
from tests.conftest import run_broker
from tests.resilience._support import STS_503, Outage, eventually, readiness, step_until, write_settings

RETRY_CAP = 30.0  # SPEC §8: at most this many seconds between pre-warm tries


def token_requests() -> float:
    return sum(
        metrics.REGISTRY.get_sample_value("wif_broker_requests_total", {"endpoint": e, "status": s}) or 0.0
        for e in ("token", "identity")
        for s in metrics.STATUS_CLASSES
    )


async def test_prewarm_retries_until_sts_recovers_and_readyz_turns_green_unasked(tmp_path: Path) -> None:
    clock = ManualClock()
    async with FakeGoogle(now=clock.wall) as google:
        outage = Outage(google.sts, 503, STS_503)
        resolved = write_settings(tmp_path, google)
        requests_before = token_requests()
        async with run_broker(resolved, clock=clock) as broker:

            async def tried() -> bool:
                return outage.calls >= 1

            await eventually(tried, "the pre-warm never called STS")
            # Five minutes of outage, one simulated second at a time; each step waits a
            # little real time and an HTTP round trip so a load it woke reaches the fake
            # before the clock moves on (else the fake would see it late).
            for _ in range(300):
                await clock.advance(1)
                await asyncio.sleep(0.01)
                assert (await readiness(broker))[0] == 503
            times = [call.at for call in google.sts.calls]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert len(times) >= 300 / RETRY_CAP, times
            assert max(gaps) <= RETRY_CAP + 2, gaps  # +2: the clock moves in 1 s steps
            outage.end()

            async def ready() -> bool:
                return (await readiness(broker))[0] == 200

            took = await step_until(clock, 1, ready, limit=RETRY_CAP + 2)
            assert took <= RETRY_CAP + 1
            assert len(google.iam.calls) == 1
        assert token_requests() == requests_before  # nobody asked: the broker did it alone


async def test_prewarm_keeps_trying_through_a_denial_at_start(tmp_path: Path) -> None:
    """An IAM binding added after the pod started (403 first): still ready without a restart."""
    clock = ManualClock()
    async with FakeGoogle(now=clock.wall) as google:
        accounts = set(google.iam.service_accounts)
        google.iam.service_accounts.clear()
        resolved = write_settings(tmp_path, google)
        async with run_broker(resolved, clock=clock) as broker:

            async def denied() -> bool:
                return "HTTP 403" in (await readiness(broker))[1]

            await eventually(denied, "the pre-warm never reached IAM")
            for _ in range(120):
                await clock.advance(1)
                await asyncio.sleep(0.01)
                assert (await readiness(broker))[0] == 503
            calls = len(google.iam.calls)
            assert 3 <= calls <= 120 / 15 + 6, calls  # capped backoff, not a hot loop
            google.iam.service_accounts.update(accounts)

            async def ready() -> bool:
                return (await readiness(broker))[0] == 200

            await step_until(clock, 1, ready, limit=RETRY_CAP + 2)

"""Upstream outages on a driven clock: stale-on-error, capped backoff, Retry-After, denials.

The broker runs the production daemon with a ManualClock, and the fakes share
that clock (``FakeGoogle(now=clock.wall)``), so a token's hour and the backoff's
seconds pass in a few hundred real HTTP round trips. Counts are read at the
fakes (requests received) and at the broker's own metrics; nothing is timed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.clock import ManualClock
from broker.fakes import FakeGoogle
from tests.conftest import run_broker
from tests.resilience._support import (
    IAM_503,
    LIFETIME,
    MIN_SERVE_TTL,
    POLICY_BACKOFF_CAP,
    STS_503,
    Outage,
    eventually,
    readiness,
    stale_served,
    step_until,
    token,
    until_ready,
    write_settings,
)

# The last moment the first token may be served: expiry - min-serve-ttl.
SERVABLE_FOR = LIFETIME - MIN_SERVE_TTL


def max_attempts(window: float, step: float) -> int:
    """Most upstream calls capped exponential backoff allows within ``window`` seconds.

    Delays are ``min(cap, 2**(n-1)) * U(0.5, 1)``: at least 0.5, 1, 2, 4, 8, then 15
    apart; a refresh also needs a clock step to wake, so never closer than ``step``.
    """
    attempts, spent = 1, 0.0
    while True:
        spent += max(step, 0.5 * min(POLICY_BACKOFF_CAP, 2.0 ** min(attempts - 1, 32)))
        if spent > window:
            return attempts
        attempts += 1


def assert_federated_token_stayed_cached(google: FakeGoogle) -> None:
    """IAM failing must not send the broker back to STS: one exchange at start-up, plus at
    most the federated token's own scheduled refresh (a first refresh may come any time
    from 60 s after the mint, spread for fleets); never one per IAM retry or request."""
    assert 1 <= len(google.sts.calls) <= 2, [call.at for call in google.sts.calls]
    if len(google.sts.calls) == 2:
        assert google.sts.calls[1].at - google.sts.calls[0].at >= 60


async def test_sts_outage_through_the_refresh_window_keeps_serving_the_cached_token(
    tmp_path: Path,
) -> None:
    """Direct access (the STS token is the access token): STS answers 503 from the moment
    the token is minted until 50 s before it stops being servable, i.e. across the whole
    refresh-ahead window (a first token's refresh may start any time from 60 s after the
    mint; later ones from expiry-960). Every client request meanwhile gets the
    same token with more than min-serve-ttl left; the broker retries with capped backoff
    (a bounded number of STS calls, not one per request) and picks up a new token within
    the backoff cap once STS is back."""
    clock = ManualClock()
    async with FakeGoogle(now=clock.wall) as google:
        resolved = write_settings(tmp_path, google, impersonate=False)
        async with run_broker(resolved, clock=clock) as broker:
            await until_ready(broker)
            start = clock.wall()
            first = await token(broker.url)
            assert first.status == 200, first.text
            stale_before = stale_served()
            outage = Outage(google.sts, 503, STS_503)
            requests = 0
            while clock.wall() - start < SERVABLE_FOR - 50:
                await clock.advance(20 if clock.wall() - start < 2600 else 5)
                answer = await token(broker.url)
                requests += 1
                assert answer.status == 200, answer.text
                assert answer.access_token == first.access_token
                assert answer.expires_in > MIN_SERVE_TTL
            assert (await readiness(broker))[0] == 200
            # The first refresh of a key is spread anywhere in its lifetime (fleet jitter),
            # so the failing window starts at the first refused call, not at a fixed time.
            failing_window = clock.wall() - outage.first_call_at
            assert 2 <= outage.calls <= max_attempts(failing_window, 5), (outage.calls, requests)
            assert stale_served() > stale_before

            outage.end()

            async def rotated() -> bool:
                answer = await token(broker.url)
                assert answer.status == 200, answer.text
                return answer.access_token != first.access_token

            took = await step_until(clock, 1, rotated, limit=POLICY_BACKOFF_CAP + 10)
            fresh = await token(broker.url)
            assert fresh.expires_in > LIFETIME - took - 5
            assert fresh.access_token in google.sts.issued


async def test_outage_outliving_the_token_answers_503_naming_sts_then_recovers(tmp_path: Path) -> None:
    """Once the cached token is down to min-serve-ttl it is never served again: clients get
    503 naming the failing step (with Retry-After) instead, while /readyz stays 200 (latched,
    a retry in progress); when STS returns, the next token arrives within the backoff cap."""
    clock = ManualClock()
    async with FakeGoogle(now=clock.wall) as google:
        resolved = write_settings(tmp_path, google, impersonate=False)
        async with run_broker(resolved, clock=clock) as broker:
            await until_ready(broker)
            start = clock.wall()
            first = await token(broker.url)
            outage = Outage(google.sts, 503, STS_503)
            await clock.advance(2600)
            while clock.wall() - start < SERVABLE_FOR + 120:
                await clock.advance(10)
                answer = await token(broker.url)
                if clock.wall() - start < SERVABLE_FOR:
                    assert answer.status == 200, answer.text
                    assert answer.expires_in > MIN_SERVE_TTL
                    continue
                assert answer.status == 503, answer.text
                assert answer.text.startswith("sts failed (HTTP 503): unavailable"), answer.text
                assert "Retry-After" in answer.headers
                assert first.access_token not in answer.text
            # SPEC §8: readiness latched after the first success; the refresh still retries.
            assert (await readiness(broker))[0] == 200
            outage.end()

            async def recovered() -> bool:
                answer = await token(broker.url)
                assert answer.status in (200, 503), answer.text
                return answer.status == 200

            await step_until(clock, 1, recovered, limit=POLICY_BACKOFF_CAP + 10)
            assert (await token(broker.url)).expires_in > MIN_SERVE_TTL


RATE_LIMITED = {
    "sts": ("sts", {"error": "rate_limit_exceeded", "error_description": "Quota exceeded."}),
    "iam": (
        "iam_generate_access_token",
        {"error": {"code": 429, "message": "Quota exceeded.", "status": "RESOURCE_EXHAUSTED"}},
    ),
}


@pytest.mark.parametrize("service", ["sts", "iam"])
async def test_429_retry_after_is_honoured_without_hot_retries(service: str, tmp_path: Path) -> None:
    """A 429 with ``Retry-After: 120`` at start-up: for 120 s every client gets 503 naming
    the step and the fake sees no second request, however many clients ask; after 120 s
    the next request goes upstream once and succeeds."""
    step, body = RATE_LIMITED[service]
    clock = ManualClock()
    async with FakeGoogle(now=clock.wall) as google:
        fake = google.sts if service == "sts" else google.iam
        fake.fail_next(429, body, headers={"Retry-After": "120"})
        resolved = write_settings(tmp_path, google)
        async with run_broker(resolved, clock=clock) as broker:

            async def prewarm_failed() -> bool:
                return "HTTP 429" in (await readiness(broker))[1]

            await eventually(prewarm_failed, "the pre-warm never failed")
            assert len(fake.calls) == 1
            start = clock.wall()  # the clock has not moved: the failed load started now
            for offset in [*range(0, 120, 4), 119]:
                await clock.advance(start + offset - clock.wall())
                for _ in range(3):
                    answer = await token(broker.url)
                    assert answer.status == 503, answer.text
                    assert answer.text.startswith(f"{step} failed (HTTP 429)"), answer.text
                assert len(fake.calls) == 1, f"retried {len(fake.calls) - 1} time(s) within Retry-After"
            await clock.advance(start + 121 - clock.wall())
            answer = await token(broker.url)
            assert answer.status == 200, answer.text
            assert len(fake.calls) == 2
            if service == "iam":
                assert_federated_token_stayed_cached(google)


async def test_iam_denial_is_not_retried_hot(tmp_path: Path) -> None:
    """IAM 403 PERMISSION_DENIED: every client gets 403 with the binding to add, and IAM is
    asked again only as the capped backoff allows: once for any number of requests at one
    instant, a bounded handful over two minutes of one request per second."""
    clock = ManualClock()
    async with FakeGoogle(now=clock.wall) as google:
        google.iam.service_accounts.clear()
        resolved = write_settings(tmp_path, google)
        async with run_broker(resolved, clock=clock) as broker:

            async def prewarm_failed() -> bool:
                return "HTTP 403" in (await readiness(broker))[1]

            await eventually(prewarm_failed, "the pre-warm never failed")
            assert len(google.iam.calls) == 1
            for _ in range(25):  # all within the first backoff: the clock stands still
                answer = await token(broker.url)
                assert answer.status == 403, answer.text
                assert answer.text.startswith("iam_generate_access_token failed (HTTP 403)"), answer.text
                assert "roles/iam.workloadIdentityUser" in answer.text
            assert len(google.iam.calls) == 1
            for _ in range(120):
                await clock.advance(1)
                answer = await token(broker.url)
                assert answer.status == 403, answer.text
            retries = len(google.iam.calls) - 1
            # Backoff 1, 2, 4, 8, 16, 30, 30 ... (x0.5-1): at least 3, at most max_attempts calls.
            assert 3 <= retries <= max_attempts(120, 1), retries
            assert_federated_token_stayed_cached(google)


async def test_iam_outage_during_refresh_serves_stale_with_impersonation(tmp_path: Path) -> None:
    """With impersonation, STS and IAM both down across the refresh window: the cached
    access token is served until min-serve-ttl, refreshes are bounded by backoff on both
    fakes, and both tokens are renewed within the cap when the services return."""
    clock = ManualClock()
    async with FakeGoogle(now=clock.wall) as google:
        resolved = write_settings(tmp_path, google)
        async with run_broker(resolved, clock=clock) as broker:
            await until_ready(broker)
            start = clock.wall()
            first = await token(broker.url)
            sts_down = Outage(google.sts, 503, STS_503)
            iam_down = Outage(google.iam, 503, IAM_503)
            await clock.advance(2600)
            while clock.wall() - start < SERVABLE_FOR - 30:
                await clock.advance(5)
                answer = await token(broker.url)
                assert answer.status == 200, answer.text
                assert answer.access_token == first.access_token
                assert answer.expires_in > MIN_SERVE_TTL
            assert 1 <= iam_down.calls <= max_attempts(clock.wall() - iam_down.first_call_at, 5)
            assert 1 <= sts_down.calls <= max_attempts(clock.wall() - sts_down.first_call_at, 5)
            sts_down.end()
            iam_down.end()

            async def rotated() -> bool:
                return (await token(broker.url)).access_token != first.access_token

            await step_until(clock, 1, rotated, limit=POLICY_BACKOFF_CAP + 10)

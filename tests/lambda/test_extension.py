"""``wif-broker lambda-extension`` against a strict fake of the Extensions API (SPEC §10).

The extension runs as Lambda runs it: a separate process started with the function's
environment (execution-role keys, ``AWS_LAMBDA_RUNTIME_API``, ``WIF_BROKER_*``), and
the function is a real google-auth (and gcloud) process with the metadata env.
(``lambda`` is a keyword, so this package imports its helpers relatively.)
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from broker import cli, lambda_ext
from broker.clock import ManualClock
from broker.lambda_api import Event
from tests.aws._harness import caller_identity_calls
from tests.clients._storage import BUCKET, CONTENT, OBJECT, fake_gcs
from tests.clients._subproc import run
from tests.clients._toolchains import require_module
from tests.conftest import require_tool

from ._sandbox import TOKEN_PATH, Sandbox, exit_status, extension, sandbox


async def test_first_invoke_is_served_from_cache(tmp_path: Path) -> None:
    gcloud = require_tool("gcloud")
    async with sandbox() as box, extension(box) as proc:
        first = await box.runtime.wait_for_poll(1)
        # Registered before any upstream call, minted before asking for the first event.
        assert box.runtime.calls == ["register", "next"]
        assert box.runtime.registered_at is not None
        assert box.runtime.registered_at < box.google.sts.calls[0].at
        assert first.probe == (1, 1), "the default token was not minted (exactly once) during init"
        subjects = [t.subject for t in box.google.sts.issued.values()]
        assert subjects == [box.role_session_arn], "STS did not see the function's execution role"

        box.runtime.deliver_invoke()
        function = (await box.run_function()).json()
        config = tmp_path / "gcloud"
        config.mkdir()
        printed = await run(gcloud, "auth", "print-access-token", env=box.function_env(config))
        second = await box.runtime.wait_for_poll(2)

        assert function["token"] in box.google.iam.issued_access
        assert function["email"] == box.env["WIF_BROKER_SERVICE_ACCOUNT"]
        assert printed.stdout.strip() == function["token"]
        assert second.probe == (1, 1), "the invoke caused an STS or IAM call"
        # gcloud also fetches an ID token for its own client audience: another token kind,
        # minted on its demand. The access token every client asked for came from cache.
        minted = [c.path.rpartition(":")[2] for c in box.google.iam.calls]
        assert minted == ["generateAccessToken", "generateIdToken"]
        assert len(box.google.sts.calls) == 1

        box.runtime.deliver_shutdown(deadline_seconds=2.0)
        status, output = await exit_status(proc)
        assert status == 0, output
        assert "drain cut short" not in output, "an idle extension waited for the deadline"
        assert box.runtime.violations == []
        assert box.runtime.errors == []
        assert function["token"] not in output
        # No egress the chain does not need (SPEC §8): the extension never asks AWS STS who
        # it is; `wif-broker check` with the function's role does that.
        assert caller_identity_calls(box.aws) == []


async def test_configuration_error_is_reported_after_registering() -> None:
    async with sandbox(min_serve_ttl="soon") as box, extension(box) as proc:
        status, output = await exit_status(proc)
        assert status == 2, output
        assert box.runtime.calls == ["register", "init/error"]
        report = box.runtime.errors[0]
        assert report.error_type == "Extension.ConfigError"
        assert report.body["errorType"] == "Extension.ConfigError"
        assert "min-serve-ttl" in report.body["errorMessage"]
        assert box.counts() == (0, 0), "an upstream was called with a broken configuration"
        assert box.runtime.violations == []


async def test_iam_denial_during_init_is_reported_and_exits_non_zero() -> None:
    denied = "stranger@wif-broker-demo.iam.gserviceaccount.com"  # not impersonable on the fake
    async with sandbox(service_account=denied) as box, extension(box) as proc:
        status, output = await exit_status(proc)
        assert status == 1, output
        assert box.runtime.calls == ["register", "init/error"]
        report = box.runtime.errors[0]
        assert report.error_type == "Extension.MintError"
        message = report.body["errorMessage"]
        assert "iam_generate_access_token" in message
        assert "403" in message
        for token in box.google.sts.issued:
            assert token not in message, "a token leaked into init/error"
            assert token not in output, "a token leaked into the log"
        assert box.runtime.violations == []


async def in_flight_at_iam(
    box: Sandbox, session: aiohttp.ClientSession, url: str
) -> asyncio.Task[aiohttp.ClientResponse]:
    """A token request to the extension, started and seen at IAM (its second call there)."""
    request = asyncio.create_task(
        session.get(url, headers={"Metadata-Flavor": "Google"}, timeout=aiohttp.ClientTimeout(10))
    )
    # The fakes signal nothing on arrival; poll their call log (bounded by the timeout).
    async with asyncio.timeout(10):
        while box.counts()[1] < 2:  # noqa: ASYNC110  # the request reached IAM: in flight
            await asyncio.sleep(0.02)
    return request


async def test_shutdown_lets_an_in_flight_request_finish() -> None:
    async with sandbox() as box, extension(box) as proc:
        await box.runtime.wait_for_poll(1)
        box.google.iam.delay_seconds = 1.0  # the next mint (a new scope set) is slow
        url = f"http://{box.metadata_host}{TOKEN_PATH}?scopes=https://www.googleapis.com/auth/devstorage.read_only"
        async with aiohttp.ClientSession() as session:
            request = await in_flight_at_iam(box, session, url)
            # Roomier than Lambda's 2 s so a loaded machine cannot turn the drain into a cut.
            box.runtime.deliver_shutdown(deadline_seconds=5.0)
            async with await request as response:
                body = await response.json()
            assert response.status == 200, body
            assert body["access_token"] in box.google.iam.issued_access
        status, output = await exit_status(proc)
        assert status == 0, output
        assert "drain cut short" not in output
        assert box.runtime.calls == ["register", "next"]
        assert box.runtime.violations == []


async def test_a_runtime_api_failure_after_init_is_reported_with_exit_error() -> None:
    async with sandbox() as box, extension(box) as proc:
        await box.runtime.wait_for_poll(1)
        box.runtime.deliver_failure()
        status, output = await exit_status(proc)
        assert status == 1, output
        assert box.runtime.calls == ["register", "next", "exit/error"]
        report = box.runtime.errors[0]
        assert report.error_type == "Extension.RuntimeApiError"
        assert "HTTP 500" in report.body["errorMessage"]
        assert box.runtime.violations == []


def test_outside_lambda_it_says_so_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["lambda-extension"]) == 2
    assert "AWS_LAMBDA_RUNTIME_API is not set" in capsys.readouterr().err


def test_admin_listener_defaults_to_loopback_in_a_sandbox() -> None:
    assert lambda_ext._lambda_defaults({}, {})["admin_listen"] == "127.0.0.1:8989"
    explicit = {"WIF_BROKER_ADMIN_LISTEN": "0.0.0.0:9000"}
    assert "admin_listen" not in lambda_ext._lambda_defaults({}, explicit)


async def test_shutdown_exits_0_by_the_deadline_even_if_a_request_is_stuck() -> None:
    async with sandbox() as box, extension(box) as proc:
        await box.runtime.wait_for_poll(1)
        gate = box.google.iam.gate = asyncio.Event()  # this mint does not finish before the deadline
        url = f"http://{box.metadata_host}{TOKEN_PATH}?scopes=https://www.googleapis.com/auth/bigquery"
        async with aiohttp.ClientSession() as session:
            request = await in_flight_at_iam(box, session, url)
            deadline = box.runtime.deliver_shutdown(deadline_seconds=1.0)
            status, output = await exit_status(proc)
            exited_at = time.time()
            assert status == 0, output
            assert "drain cut short by the shutdown deadline" in output
            # Without the cut the drain waits for the stuck mint (5 s or more). That the cut
            # falls before the deadline is test_the_drain_is_cut_short_before_the_deadline's
            # job, on a manual clock; here only a gross overrun fails, not a loaded machine.
            assert exited_at < deadline + 2.0, f"exited {exited_at - deadline:.2f}s after the deadline"
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            gate.set()  # let the fake IAM's handler end, so the fake stops at once
        assert box.runtime.violations == []


async def test_the_drain_is_cut_short_before_the_deadline() -> None:
    clock = ManualClock()
    deadline = clock.wall() + 1.0
    stuck = asyncio.Event()
    server = asyncio.create_task(stuck.wait())  # a drain that never ends
    event = Event("SHUTDOWN", int(deadline * 1000), "", "spindown")
    exiting = asyncio.create_task(lambda_ext._shutdown(event, server, asyncio.Event(), clock))
    await clock.advance(1.0 - lambda_ext.SHUTDOWN_MARGIN_SECONDS - 0.01)
    assert not exiting.done(), "cut before the margin"
    await clock.advance(0.01)
    assert await asyncio.wait_for(exiting, 1) == 0
    await asyncio.gather(server, return_exceptions=True)
    assert server.cancelled(), "the stuck drain was left running"


STORAGE_FUNCTION = """
import json, sys
from google.cloud import storage

endpoint, bucket, name = sys.argv[1:4]
client = storage.Client(client_options={"api_endpoint": endpoint})
data = client.bucket(bucket).blob(name).download_as_bytes()
print(json.dumps({"project": client.project, "data": data.decode(), "token": client._credentials.token}))
"""


async def test_seed_004_function_reads_cloud_storage_with_its_execution_role() -> None:
    """Seed 004's function (Lambda → Cloud Storage), with no credential file in its package."""
    require_module("google.cloud.storage")
    async with sandbox() as box, fake_gcs(box.google) as gcs, extension(box) as proc:
        await box.runtime.wait_for_poll(1)
        box.runtime.deliver_invoke()
        env = box.function_env()
        assert "GOOGLE_APPLICATION_CREDENTIALS" not in env
        result = await run(sys.executable, "-c", STORAGE_FUNCTION, gcs.url, BUCKET, OBJECT, env=env)
        out = result.json()
        assert out["data"] == CONTENT.decode(), result.describe()
        assert out["project"] == "wif-broker-demo"
        assert set(gcs.bearers) == {out["token"]}
        assert [t.subject for t in box.google.sts.issued.values()] == [box.role_session_arn]
        await box.runtime.wait_for_poll(2)
        # google-cloud-storage names its own scopes (devstorage.*): that scope set costs one
        # generateAccessToken on first use, on the federated token minted during init.
        assert box.counts() == (1, 2)
        box.runtime.deliver_invoke()  # a warm invoke: everything from cache
        again = (await run(sys.executable, "-c", STORAGE_FUNCTION, gcs.url, BUCKET, OBJECT, env=env)).json()
        await box.runtime.wait_for_poll(3)
        assert again["token"] == out["token"]
        assert box.counts() == (1, 2)
        box.runtime.deliver_shutdown()
        status, output = await exit_status(proc)
        assert status == 0, output

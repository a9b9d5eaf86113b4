"""The federation chain end to end: real broker, strict fake upstreams, real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker import settings
from broker.fakes import FakeGoogle
from tests.conftest import PROJECT, SA, credential_info, run_broker

MF = {"Metadata-Flavor": "Google"}
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
GCLOUD_AUDIENCE = "32555940559.apps.googleusercontent.com"


async def get(url: str, **params: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=MF, params=params) as resp:
        return resp.status, await resp.text()


def iam_calls(google: FakeGoogle, method: str) -> list[Any]:
    return [c for c in google.iam.calls if c.path.endswith(":" + method)]


async def test_one_sts_call_serves_many_scope_sets_and_id_tokens(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    async with run_broker(make_settings()) as broker:
        scope_sets = [f"https://www.googleapis.com/auth/s{i}" for i in range(5)]
        results = await asyncio.gather(*(get(broker.url + TOKEN_PATH, scopes=s) for s in scope_sets))
        assert all(status == 200 for status, _ in results)
        status, _ = await get(broker.url + IDENTITY_PATH, audience="https://a.example", format="full")
        assert status == 200
    assert len(google.sts.calls) == 1
    # 5 scope sets + the pre-warmed default set; one ID token.
    assert len(iam_calls(google, "generateAccessToken")) == 6
    assert len(iam_calls(google, "generateIdToken")) == 1
    sts_form = google.sts.calls[0].form
    assert sts_form is not None
    assert sts_form["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    assert sts_form["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert sts_form["requested_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    id_call = iam_calls(google, "generateIdToken")[0]
    assert id_call.json == {"audience": "https://a.example", "delegates": None, "includeEmail": True}


async def test_scopes_reach_iam_order_insensitively(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    async with run_broker(make_settings()) as broker:
        a, b = "https://www.googleapis.com/auth/a", "https://www.googleapis.com/auth/b"
        first = await get(broker.url + TOKEN_PATH, scopes=f"{a},{b}")
        second = await get(broker.url + TOKEN_PATH, scopes=f"{b},{a},{a}")
    assert json.loads(first[1])["access_token"] == json.loads(second[1])["access_token"]
    bodies = [c.json for c in iam_calls(google, "generateAccessToken")]
    assert {"delegates": None, "scope": [a, b], "lifetime": "3600s"} in bodies


async def test_lifetime_and_quota_project_from_the_file(
    tmp_path: Path, google: FakeGoogle, token_file: Path
) -> None:
    info = credential_info(google, token_file)
    info["service_account_impersonation"] = {"token_lifetime_seconds": 2800}
    info["quota_project_id"] = "billing-project"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(info))
    flags = {"credentials": str(path), "listen": ["127.0.0.1:0"], "admin_listen": "127.0.0.1:0"}
    async with run_broker(settings.build(flags, environ={})) as broker:
        status, body = await get(broker.url + TOKEN_PATH)
    assert status == 200
    assert 2700 < json.loads(body)["expires_in"] <= 2800
    call = iam_calls(google, "generateAccessToken")[0]
    assert call.json["lifetime"] == "2800s"
    assert call.headers["x-goog-user-project"] == "billing-project"


async def test_direct_federated_access_without_impersonation(
    tmp_path: Path, google: FakeGoogle, token_file: Path
) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(credential_info(google, token_file, impersonate=False)))
    flags = {
        "credentials": str(path),
        "project_id": PROJECT,
        "listen": ["127.0.0.1:0"],
        "admin_listen": "127.0.0.1:0",
    }
    async with run_broker(settings.build(flags, environ={})) as broker:
        status, body = await get(broker.url + TOKEN_PATH, scopes="https://www.googleapis.com/auth/bigquery")
        assert status == 200
        assert json.loads(body)["access_token"] in google.sts.issued
        email = await get(broker.url + "/computeMetadata/v1/instance/service-accounts/default/email")
        assert email == (200, f"{PROJECT}.svc.id.goog")
        status, text = await get(broker.url + IDENTITY_PATH, audience="https://a.example")
        assert status == 404
        assert "service account" in text
    assert google.iam.calls == []
    # Without impersonation the caller's scopes go to STS itself.
    assert any(
        c.form and c.form["scope"] == "https://www.googleapis.com/auth/bigquery" for c in google.sts.calls
    )


async def test_subject_token_file_is_reread_on_every_exchange(
    google: FakeGoogle, token_file: Path, make_settings: Callable[..., settings.Settings]
) -> None:
    async with run_broker(make_settings()) as broker:
        await get(broker.url + TOKEN_PATH)
        rotated = google.subject_token(subject="system:serviceaccount:default:rotated")
        await asyncio.to_thread(token_file.write_text, rotated)
    async with run_broker(make_settings()) as broker:
        await get(broker.url + TOKEN_PATH)
    forms = [c.form for c in google.sts.calls if c.form]
    assert forms[-1]["subject_token"] == rotated
    assert forms[0]["subject_token"] != rotated


async def test_sts_invalid_target_is_a_denial_with_a_fix(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    google.sts.fail_next(
        400,
        {
            "error": "invalid_target",
            "error_description": "The target service indicated by the audience is invalid.",
        },
        count=10,
    )
    async with run_broker(make_settings()) as broker:
        status, text = await get(broker.url + TOKEN_PATH)
        ready = await get_admin(broker.admin_url + "/readyz")
    assert status == 403
    assert "sts failed (HTTP 400): invalid_target" in text
    assert "is disabled or deleted" in text
    assert ready[0] == 503
    assert "invalid_target" in ready[1]["reason"]


async def test_transient_sts_failure_is_a_503_naming_the_step(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    google.sts.fail_next(503, {"error": "unavailable", "error_description": "try later"}, count=10)
    async with run_broker(make_settings()) as broker:
        status, text = await get(broker.url + TOKEN_PATH)
    assert status == 503
    assert text.startswith("sts failed (HTTP 503)")


async def test_iam_permission_denied_names_the_binding_to_add(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    google.iam.service_accounts.clear()
    async with run_broker(make_settings()) as broker:
        status, text = await get(broker.url + TOKEN_PATH)
        gcloud_status, _ = await get(broker.url + IDENTITY_PATH, audience=GCLOUD_AUDIENCE)
        other_status, _ = await get(broker.url + IDENTITY_PATH, audience="https://a.example")
    assert status == 403
    assert "iam_generate_access_token failed (HTTP 403)" in text
    assert "roles/iam.workloadIdentityUser" in text
    assert gcloud_status == 404, "gcloud aborts on 403/5xx for its own audience; 404 is ignored"
    assert other_status == 403


async def test_missing_token_file_is_transient_and_names_the_path(
    tmp_path: Path, make_settings: Callable[..., settings.Settings], token_file: Path
) -> None:
    await asyncio.to_thread(token_file.unlink)
    async with run_broker(make_settings()) as broker:
        status, text = await get(broker.url + TOKEN_PATH)
    assert status == 503
    assert f"token file {token_file} does not exist" in text


async def test_url_source_normalises_azure_metadata_header(tmp_path: Path, google: FakeGoogle) -> None:
    from aiohttp import web

    seen: list[str] = []

    async def imds(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Metadata", ""))
        if request.headers.get("Metadata") != "true":
            return web.json_response(
                {"error": "bad_request_102", "error_description": "Required metadata header not specified"},
                status=400,
            )
        return web.json_response({"access_token": google.subject_token(), "expires_in": "3599"})

    app = web.Application()
    app.router.add_get("/metadata/identity/oauth2/token", imds)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    info = credential_info(google, tmp_path / "unused")
    info["credential_source"] = {
        "url": f"http://127.0.0.1:{port}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api://x",
        "headers": {"Metadata": "True"},
        "format": {"type": "json", "subject_token_field_name": "access_token"},
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(info))
    flags = {"credentials": str(path), "listen": ["127.0.0.1:0"], "admin_listen": "127.0.0.1:0"}
    try:
        async with run_broker(settings.build(flags, environ={})) as broker:
            status, _ = await get(broker.url + TOKEN_PATH)
    finally:
        await runner.cleanup()
    assert status == 200
    assert seen
    assert set(seen) == {"true"}


async def test_no_token_reaches_logs_errors_or_metrics(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    from broker.logs import JsonFormatter

    async with run_broker(make_settings(**{"log_level": "debug"})) as broker:
        await get(broker.url + TOKEN_PATH)
        await get(broker.url + IDENTITY_PATH, audience="https://a.example")
        google.iam.service_accounts.clear()
        await get(broker.url + TOKEN_PATH, scopes="https://www.googleapis.com/auth/other")
        metrics_text = (await get_admin_text(broker.admin_url + "/metrics"))[1]
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    secrets = [*google.sts.issued, *google.iam.issued_access, *google.iam.issued_id]
    secrets += [c.form["subject_token"] for c in google.sts.calls if c.form]
    assert secrets
    assert lines
    for secret in secrets:
        assert all(secret not in line for line in lines)
        assert secret not in metrics_text


async def get_admin(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json()


async def get_admin_text(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def test_readiness_follows_the_default_token(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    google.sts.gate = asyncio.Event()
    async with run_broker(make_settings()) as broker:
        status, body = await get_admin(broker.admin_url + "/readyz")
        assert status == 503
        assert body["status"] == "not_ready"
        healthy = await get_admin_text(broker.admin_url + "/healthz")
        assert healthy[0] == 200
        google.sts.gate.set()
        for _ in range(100):
            status, body = await get_admin(broker.admin_url + "/readyz")
            if status == 200:
                break
            await asyncio.sleep(0.02)
        assert status == 200
        assert body["status"] == "ready"
    assert SA in google.iam.calls[0].path

"""Each misconfiguration of SPEC §11, made real in the strict fakes, diagnosed by ``check`` as a process.

Per case (tests/check/cases.py): the fakes are switched into the
misconfiguration the way Google's services express it (their real error bodies
and reasons), ``python -m broker check`` runs against them, and the test
asserts the exit code, the failing step's line and the exact fix. The same
scenario served by a running broker must give a client the symptom the
troubleshooting table lists. No output anywhere may suggest a whole-pool
``/*`` member, and no token the fakes issued may appear.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker.diagnosis import iso
from broker.fakes import FakeGoogle
from broker.fakes._service import serve_loopback
from tests.aws._harness import credential_info as aws_credential_info
from tests.aws.test_failures import HopLimitedImds
from tests.check.cases import CASES, DOC, MEMBER, POOL, STATIC, Case, fill, render_doc
from tests.clients._subproc import check_process
from tests.conftest import run_broker
from tests.fakes.aws import ISOLATED_ENV, FakeAws, accept_aws

BROKER = Path(__file__).resolve().parents[2] / "broker"
TOKEN = "/computeMetadata/v1/instance/service-accounts/default/token"
IDENTITY = "/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://x.example"
IMDS_PATH = "/metadata/identity/oauth2/token"


@dataclass
class Scenario:
    cred: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    path: str = TOKEN  # what a client asks the broker for, to see the symptom
    imds: str = ""  # a url source's token URL, to see the symptom of case 6


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def strict_imds(google: FakeGoogle) -> web.Application:
    """Azure IMDS's header rule (token-chain.md §E.2), serving a token the fake STS accepts."""

    async def token(request: web.Request) -> web.Response:
        if request.headers.get("Metadata") != "true":
            return web.json_response(
                {"error": "bad_request_102", "error_description": "Required metadata header not specified"},
                status=400,
            )
        return web.json_response({"access_token": google.subject_token(), "token_type": "Bearer"})

    app = web.Application()
    app.router.add_get(IMDS_PATH, token)
    return app


def url_source(base: str, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "url": f"{base}{IMDS_PATH}?api-version=2018-02-01&resource=api://wif-broker",
        "headers": headers,
        "format": {"type": "json", "subject_token_field_name": "access_token"},
    }


@contextlib.asynccontextmanager
async def scenario(key: str, google: FakeGoogle, tmp_path: Path) -> AsyncIterator[Scenario]:
    """The fakes (and credential file) broken the way ``key`` is."""
    token_file = tmp_path / "token"
    token_file.write_text(google.subject_token() + "\n")
    cred = google.credential_info(str(token_file))
    values = {"ISSUER": google.issuer.issuer}
    now = time.time()
    if key == "audience":
        token_file.write_text(google.issuer.mint("https://wrong.example/aud", now=now))
    elif key == "issuer":
        google.sts.issuer_uri = "https://issuer.configured.example"
    elif key == "condition":
        google.sts.attribute_condition = lambda claims: claims.get("sub") == "system:serviceaccount:prod:app"
    elif key == "binding":
        google.iam.service_accounts.clear()
    elif key == "id_binding":
        google.iam.withheld = {"iam.serviceAccounts.getOpenIdToken"}
        yield Scenario(cred, values=values, path=IDENTITY)
        return
    elif key == "project_id":
        cred["audience"] = google.audience.replace("123456789012", "wif-broker-demo")
    elif key in ("expired", "future"):
        iat = int(now - 7200 if key == "expired" else now + 3600)
        token_file.write_text(google.issuer.mint(google.audience, now=iat))
        values.update(IAT_EPOCH=str(iat), IAT=iso(iat), EXP=iso(iat + 3600))
    elif key == "disabled":
        google.sts.disabled = True
    elif key == "service_disabled":
        google.iam.api_enabled = False
    elif key == "unreachable":
        port = closed_port()
        cred["token_url"] = f"http://127.0.0.1:{port}/v1/token"
        values["HOST"] = f"127.0.0.1:{port}"
    elif key == "iam_unreachable":
        port = closed_port()
        cred["service_account_impersonation_url"] = (
            f"http://127.0.0.1:{port}/v1/projects/-/serviceAccounts/{STATIC['SA']}:generateAccessToken"
        )
        values["HOST"] = f"127.0.0.1:{port}"
    elif key == "imds_unreachable":
        port = closed_port()
        cred["credential_source"] = url_source(f"http://127.0.0.1:{port}", {"Metadata": "true"})
        values["HOST"] = f"127.0.0.1:{port}"
    elif key == "x509":
        cred["subject_token_type"] = "urn:ietf:params:oauth:token-type:mtls"
        cred["credential_source"] = {"certificate": {"use_default_certificate_config": True}}
    elif key == "metadata_true":
        runner, base = await serve_loopback(strict_imds(google))
        try:
            cred["credential_source"] = url_source(base, {"Metadata": "True"})
            yield Scenario(cred, values=values, imds=cred["credential_source"]["url"])
        finally:
            await runner.cleanup()
        return
    elif key == "no_credentials":
        nowhere = f"http://127.0.0.1:{closed_port()}/"
        env = {**ISOLATED_ENV, "AWS_REGION": "us-east-2", "AWS_EC2_METADATA_SERVICE_ENDPOINT": nowhere}
        yield Scenario(aws_credential_info(google, nowhere), env=env, values=values)
        return
    elif key == "aws_binding":
        async with FakeAws() as aws:
            accept_aws(google.sts, aws.account)
            google.iam.service_accounts.clear()
            env = {**aws.imds_env(), "AWS_REGION": "us-east-2", "AWS_ENDPOINT_URL_STS": aws.sts_url}
            values["AWS_ROLE_MEMBER"] = (
                f"principalSet://iam.googleapis.com/{POOL}/attribute.aws_role/"
                "arn:aws:sts::123456789012:assumed-role/wif-broker-role"
            )
            yield Scenario(aws_credential_info(google, aws.imds_url), env=env, values=values)
        return
    elif key == "hop_limit":
        aws = FakeAws()
        aws.imds = imds = HopLimitedImds(aws.account)
        async with aws:
            try:
                env = {**aws.imds_env(), "AWS_REGION": "us-east-2"}
                yield Scenario(aws_credential_info(google, aws.imds_url), env=env, values=values)
            finally:
                imds.release.set()
        return
    else:
        raise AssertionError(f"no scenario {key}")
    yield Scenario(cred, values=values)


async def symptom(case: Case, setup: Scenario, cred_file: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """What a client sees: the broker's answer, the start-up error, or (case 6) IMDS's answer."""
    if setup.imds:
        async with (
            aiohttp.ClientSession() as session,
            session.get(setup.imds, headers={"Metadata": "True"}) as r,
        ):
            body = await r.json()
            return f"{r.status} {body['error']}: {body['error_description']}"
    for key, value in setup.env.items():
        monkeypatch.setenv(key, value)
    from broker import settings
    from broker.errors import ConfigError

    try:
        resolved = settings.build(
            {"credentials": str(cred_file), "listen": ["127.0.0.1:0"], "admin_listen": "127.0.0.1:0"},
            environ={},
        )
    except ConfigError as exc:
        return f"wif-broker: configuration error: {exc}"
    async with (
        run_broker(resolved) as broker,
        aiohttp.ClientSession() as session,
        session.get(broker.url + setup.path, headers={"Metadata-Flavor": "Google"}) as resp,
    ):
        return f"{resp.status} {await resp.text()}"


def expected_symptom(case: Case, values: dict[str, str]) -> list[str]:
    """The parts of the table's symptom a run can check: status, and the quoted text up to '...'."""
    text = fill(case.symptom, values)
    parts = [text.split(" ", 1)[0]] if text[:3].isdigit() else []
    quoted = re.search(r"`([^`]*)`", text)
    if quoted:
        parts.extend(p for p in quoted.group(1).split("...") if p.strip())
    return [p.strip() for p in parts]


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
async def test_check_names_the_step_and_the_fix(
    case: Case, google: FakeGoogle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with scenario(case.key, google, tmp_path) as setup:
        cred_file = tmp_path / "credentials.json"
        cred_file.write_text(json.dumps(setup.cred))
        result = await check_process(cred_file, setup.env)
        seen = await symptom(case, setup, cred_file, monkeypatch)
    values = {**STATIC, **setup.values}
    line, fix = fill(case.line, values), fill(case.fix, values)
    assert result.returncode == case.exit_code, result.describe()
    if case.exit_code == 2:
        assert result.stderr.strip() == line, result.describe()  # one line
        assert fix in line
    else:
        lines = result.stdout.splitlines()
        at = next((i for i, text in enumerate(lines) if text.startswith(line)), None)
        assert at is not None, f"no line starting {line!r}:{result.describe()}"
        assert lines[at + 1].startswith("      fix: "), result.describe()
        # The fix follows its step's line; every later line is indented under it.
        rest = lines[at + 1 :]
        # Commands stand alone on their line (copy-pasteable); prose fixes may start a line.
        assert any(text.removeprefix("      fix: ").strip().startswith(fix) for text in rest), (
            f"no line {fix!r}:{result.describe()}"
        )
        if case.exit_code == 1:
            assert all(text.startswith("      ") for text in rest), result.describe()
            assert sum(text.startswith("FAIL  ") for text in lines) == 1, result.describe()
    for part in expected_symptom(case, values):
        assert part in seen, (part, seen)
    if seen[:3] in ("403", "503") and case.key != "aws_binding":
        # One diagnosis: the metadata server's body carries the fix check printed. (An AWS
        # role is known to run only after its start-up describe, so that body may say less.)
        assert fix in seen, (fix, seen)
    output = result.stdout + result.stderr + seen
    assert "/*" not in output
    issued = [*google.sts.issued, *google.iam.issued_access, *google.iam.issued_id]
    assert not any(token in output for token in issued)


async def test_a_healthy_configuration_passes_every_step_and_prints_no_token(
    google: FakeGoogle, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    subject = google.subject_token()
    token_file.write_text(subject + "\n")
    cred_file = tmp_path / "credentials.json"
    cred_file.write_text(json.dumps(google.credential_info(str(token_file))))
    result = await check_process(cred_file)
    assert result.returncode == 0, result.describe()
    lines = result.stdout.splitlines()
    steps = [text.split(" ", 1)[0] for text in lines if not text.startswith((" ", "audience", "account"))]
    assert steps == ["ok"] * 5, result.describe()
    assert f"      bind roles/iam.workloadIdentityUser to: {MEMBER}" in lines, result.describe()
    assert re.search(r" exp=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", result.stdout), result.describe()
    assert re.search(r"expires \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", result.stdout), result.describe()
    issued = [subject, *google.sts.issued, *google.iam.issued_access, *google.iam.issued_id]
    assert len(issued) >= 4
    for token in issued:
        assert token not in result.stdout + result.stderr
    assert "/*" not in result.stdout + result.stderr


def test_no_whole_pool_member_anywhere_in_the_product() -> None:
    """A ``principalSet://…/*`` member grants every identity in the pool: never suggest one."""
    root = BROKER.parent
    shipped = [
        *BROKER.rglob("*.py"),
        root / "README.md",
        *(root / "docs").glob("*.md"),
        *(root / "k8s").rglob("*"),
    ]
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for path in shipped
        if path.is_file()
        for number, text in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if re.search(r"principalSet://[^\s'\"]*/\*|workloadIdentityPools/[^\s'\"]*/\*|/\*['\"]", text)
    ]
    assert offenders == []


def test_the_troubleshooting_table_is_generated_from_these_cases() -> None:
    current = DOC.read_text()
    assert render_doc(current) == current, "regenerate with: python -m tests.check.cases"


def test_every_case_names_a_fix_and_the_twelve_are_covered() -> None:
    numbers = {case.number for case in CASES}
    assert {str(n) for n in range(1, 13)} <= numbers
    assert all(case.fix and case.line for case in CASES)

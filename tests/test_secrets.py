"""Secrets at debug level (SPEC §8): no secret in any log line, whatever logger writes it.

The daemon runs as a real process (``python -m broker run``) at ``--log-level debug
--log-level-third-party debug`` against the fakes on loopback, so botocore, urllib3
and azure-core log everything they log in production at debug: request headers
(botocore prints ``X-Amz-Security-Token`` as bytes ``b'...'``), the canonical
request and string to sign, ``Signature:\\n<hex>``, response bodies with AWS
credentials. Every stderr byte is then scanned for every secret the fakes issued
or received: AWS secret keys and session tokens, SigV4 signatures, subject tokens,
federated, access and ID tokens, the Azure client assertion.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from broker import logs
from broker.fakes import FakeGoogle
from broker.fakes.oidc import FakeOidcIssuer
from tests.aws._harness import credential_info as aws_credential_info
from tests.aws._harness import signed_requests
from tests.azure._harness import IDENTITY_CREDENTIALS, example
from tests.fakes.aws import ISOLATED_ENV, FakeAws, accept_aws
from tests.fakes.azure import FakeAzure

MF = {"Metadata-Flavor": "Google"}
SA_PATH = "/computeMetadata/v1/instance/service-accounts/default/"
WAIT = 40.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_daemon(cred_file: Path, env: Mapping[str, str], *extra: str) -> str:
    """Start the daemon, wait until ready, ask for two tokens and an ID token, SIGTERM it;
    return everything it wrote to stderr and stdout."""
    port, admin = free_port(), free_port()
    argv = [
        sys.executable, "-m", "broker", "run",
        "--credentials", str(cred_file),
        "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin}",
        "--zone", "us-central1-a",
        "--log-level", "debug",
        "--log-level-third-party", "debug",
        *extra,
    ]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_", "WIF_BROKER_"))}
    # asyncio's subprocess: the fakes serve from this event loop, which must not block.
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT, env={**base, **env}
    )
    assert proc.stdout is not None
    collected = asyncio.create_task(proc.stdout.read())
    try:
        timeout = aiohttp.ClientTimeout(total=WAIT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with asyncio.timeout(WAIT):
                while True:
                    assert proc.returncode is None, (await collected).decode(errors="replace")
                    try:
                        async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.1)
            url = f"http://127.0.0.1:{port}{SA_PATH}"
            for path in ("token", "token?scopes=https://www.googleapis.com/auth/devstorage.read_only"):
                async with session.get(url + path, headers=MF) as resp:
                    assert resp.status == 200, await resp.text()
            async with session.get(url + "identity?audience=https://a.example", headers=MF) as resp:
                assert resp.status == 200, await resp.text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
    return (await asyncio.wait_for(collected, 10)).decode(errors="replace")


def google_secrets(google: FakeGoogle) -> list[str]:
    found = [*google.sts.issued, *google.iam.issued_access, *google.iam.issued_id]
    found += [c.form["subject_token"] for c in google.sts.calls if c.form and "subject_token" in c.form]
    return found


def assert_absent(output: str, secrets: dict[str, list[str]]) -> None:
    assert output.count("\n") > 5, output  # logging did happen
    for kind, values in secrets.items():
        assert values, f"no {kind} to look for: the scenario did not run"
        for value in values:
            # Each secret, and the first 24 characters of it (a value cut by a log line).
            for needle in {value, value[:24]}:
                assert needle not in output, f"{kind} leaked: {needle[:12]}..."


@pytest.mark.parametrize("platform", ["imds", "irsa"])
async def test_aws_secrets_never_logged_at_debug(platform: str, tmp_path: Path) -> None:
    issuer = FakeOidcIssuer() if platform == "irsa" else None
    async with FakeAws(issuer=issuer) as aws, FakeGoogle() as google:
        accept_aws(google.sts, aws.account)
        env = {**ISOLATED_ENV, "AWS_REGION": "us-east-2", "AWS_ENDPOINT_URL_STS": aws.sts_url}
        web_identity = ""
        if platform == "irsa":
            assert aws.sts.issuer is not None
            subject = "system:serviceaccount:default:app"
            web_identity = aws.sts.issuer.mint("sts.amazonaws.com", subject=subject)
            (tmp_path / "irsa-token").write_text(web_identity)
            env.update(aws.web_identity_env(str(tmp_path / "irsa-token")))
        else:
            env.update(aws.imds_env())
        cred_file = tmp_path / "credentials.json"
        cred_file.write_text(json.dumps(aws_credential_info(google, aws.imds_url)))
        output = await run_daemon(cred_file, env)
        issued = list(aws.account.credentials.values())
        secrets = {
            "AWS secret key": [c.secret_access_key for c in issued],
            "AWS session token": [c.session_token for c in issued if c.session_token],
            "SigV4 signature": [s.signature for s in signed_requests(google)],
            "Google token": google_secrets(google),
        }
        if web_identity:
            secrets["web identity token"] = [web_identity]
    assert "botocore" in output  # third-party debug logging was on
    assert_absent(output, secrets)


async def test_azure_client_assertion_never_logged_at_debug(tmp_path: Path) -> None:
    async with FakeAzure() as azure, FakeGoogle() as google:
        azure.google_provider(google.sts)
        env = azure.workload_identity_env(tmp_path / "azure-identity-token")
        assertion = (tmp_path / "azure-identity-token").read_text()
        cred_file = tmp_path / "credentials.json"
        cred_file.write_text(json.dumps(example(IDENTITY_CREDENTIALS, google)))
        output = await run_daemon(cred_file, env)
        sent = [c.form["client_assertion"] for c in azure.entra.calls if c.form]
        secrets = {
            "Azure client assertion": [assertion, *sent],
            "Entra token": [c.form["subject_token"] for c in google.sts.calls if c.form],
            "Google token": google_secrets(google),
        }
    assert "azure" in output
    assert_absent(output, secrets)


THIRD_PARTY = ("botocore.auth", "urllib3.connectionpool", "msal.application", "azure.core")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Root handlers and levels as they were; the third-party loggers at NOTSET meanwhile
    (an earlier test in this process may have set one, e.g. the Azure source quiets azure)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    names = [*THIRD_PARTY, *(name.split(".")[0] for name in THIRD_PARTY)]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in levels.items():
        logging.getLogger(name).setLevel(saved)


@pytest.mark.usefixtures("restore_logging")
def test_third_party_loggers_stay_at_info_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup_logging("debug", "json")
    logging.getLogger("broker.test").debug("own debug line")
    for name in THIRD_PARTY:
        logging.getLogger(name).debug("third-party debug line from %s", name)
        logging.getLogger(name).info("third-party info line from %s", name)
    lines = capsys.readouterr().err.splitlines()
    assert any("own debug line" in line for line in lines)
    assert not any("third-party debug line" in line for line in lines), lines
    assert sum("third-party info line" in line for line in lines) == 4

    logs.setup_logging("info", "json", "debug")
    logging.getLogger("broker.test").debug("own debug line")
    logging.getLogger("botocore.auth").debug("third-party debug line")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["third-party debug line"]


@pytest.mark.usefixtures("restore_logging")
def test_botocore_shaped_lines_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """The exact shapes botocore 1.x prints at debug, with made-up values."""
    session_token = "IQoJb3JpZ2luX2VjEFakeSessionTokenValue+/=="
    signature = "726f7ac0a796bdac8023f37a6d8a7d4fb06de149569ee07f796e685d071b18df"
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    logs.setup_logging("debug", "json", "debug")
    log = logging.getLogger("botocore.test")
    log.debug(
        "Sending http request: <AWSPreparedRequest headers={'X-Amz-Security-Token': b'%s'}>", session_token
    )
    log.debug("Signature:\n%s", signature)
    log.debug(
        "CanonicalRequest:\nPOST\n/\n\nhost:sts.amazonaws.com\nx-amz-security-token:%s\n", session_token
    )
    log.debug("Response body:\nb'<Credentials><SecretAccessKey>%s</SecretAccessKey></Credentials>'", secret)
    log.debug('Response body: {"SecretAccessKey" : "%s", "Token" : "%s"}', secret, session_token)
    for text in (logs.redact(f"Signature:\\n{signature}"), capsys.readouterr().err):
        for value in (session_token, signature, secret):
            assert value not in text

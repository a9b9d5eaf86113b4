"""End to end: the sidecar exactly as the webhook injects it gives the app a token.

The webhook admits a Deployment pod; the sidecar then runs from the patched pod's own
``args`` (only the token path and the two ports mapped to this test's), with the
regional-endpoint style ``sidecar-args`` pointing it at the fake STS and IAM, and its
subject token minted for the audience of the injected projected volume. Real
google-auth and real gcloud, in processes with the patched app container's env, get
a token for the annotated Google service account.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.fakes import DEFAULT_SERVICE_ACCOUNT, FakeGoogle
from tests.clients._subproc import run
from tests.conftest import require_tool
from tests.fakes.tls import make_test_ca
from tests.webhook import _pods
from tests.webhook._fakeapi import FakeApiServer
from tests.webhook._process import WebhookProcess, free_port

pytestmark = pytest.mark.client

TOKEN_PATH = "/var/run/secrets/wif-broker/token"
GOOGLE_AUTH = """
import json
import google.auth
from google.auth.transport.requests import Request

creds, project = google.auth.default()
creds.refresh(Request())
print(json.dumps({"token": creds.token, "email": creds.service_account_email, "project": project,
                  "kind": type(creds).__module__}))
"""


def _map(value: str, port: int) -> str:
    return value.replace("127.0.0.1:8988", f"127.0.0.1:{port}")


def _sidecar_argv(sidecar: dict[str, Any], token: Path, port: int, admin: int) -> list[str]:
    """The injected args with only the token path and the ports changed."""
    mapped = []
    for arg in sidecar["args"]:
        arg = arg.replace(f"file:{TOKEN_PATH}", f"file:{token}")
        arg = arg.replace("--admin-listen=0.0.0.0:8989", f"--admin-listen=127.0.0.1:{admin}")
        mapped.append(_map(arg, port))
    return mapped


@pytest.fixture
async def injected(
    tmp_path: Path, google: FakeGoogle
) -> AsyncIterator[tuple[dict[str, Any], WebhookProcess]]:
    api = FakeApiServer(tmp_path / "api")
    (tmp_path / "api").mkdir()
    api.start()
    api.add("team-a", "app", {"iam.gke.io/gcp-service-account": DEFAULT_SERVICE_ACCOUNT})
    (tmp_path / "tls").mkdir()
    make_test_ca(tmp_path / "tls")
    extra = shlex.join([f"--token-url={google.token_url}", f"--iam-endpoint={google.iam_base_url}"])
    process = WebhookProcess(
        tmp_path,
        api.write_kubeconfig(tmp_path / "kubeconfig"),
        tmp_path / "tls" / "server.pem",
        tmp_path / "tls" / "server.key",
        tmp_path / "tls" / "ca.pem",
        f"--sidecar-image={_pods.IMAGE}",
        f"--audience={google.audience}",
        f"--sidecar-args={extra}",
    )
    try:
        await asyncio.to_thread(process.wait_ready)
        pod = _pods.deployment_pod("app")
        answer = await asyncio.to_thread(process.review, pod)
        yield answer.apply(pod), process
    finally:
        assert await asyncio.to_thread(process.stop) == 0
        api.stop()


async def _wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            assert proc.returncode is None, "the injected sidecar exited"
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the injected sidecar never became ready")


async def test_injected_pod_gets_a_token_for_the_annotated_account(
    injected: tuple[dict[str, Any], WebhookProcess], google: FakeGoogle, tmp_path: Path
) -> None:
    pod, _ = injected
    sidecar = pod["spec"]["initContainers"][0]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "wif-broker-token"]
    projected = volume["projected"]["sources"][0]["serviceAccountToken"]
    # What the kubelet would write: a token for the projected volume's audience.
    token = tmp_path / "token"
    token.write_text(google.issuer.mint(projected["audience"], "system:serviceaccount:team-a:app", 3600))
    port, admin = free_port(), free_port()
    argv = _sidecar_argv(sidecar, token, port, admin)
    assert argv[0] == "run"
    # The sidecar container sets no env: the process gets none beyond what Python needs.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        *argv,
        env={"PATH": os.environ["PATH"]},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_ready(f"http://127.0.0.1:{admin}/readyz", proc)
        app = pod["spec"]["containers"][0]
        base = {k: v for k, v in os.environ.items() if not k.startswith(("GCE_", "CLOUDSDK_", "GOOGLE_"))}
        base.pop("METADATA_EMULATOR_HOST", None)
        app_env = {**base, **{e["name"]: _map(e["value"], port) for e in app["env"]}}
        result = (await run(sys.executable, "-c", GOOGLE_AUTH, env=app_env)).json()
        assert result["kind"] == "google.auth.compute_engine.credentials"
        assert result["email"] == DEFAULT_SERVICE_ACCOUNT
        assert result["project"] == "wif-broker-demo"
        assert result["token"] in google.iam.issued_access

        gcloud = require_tool("gcloud")
        gcloud_env = {
            **app_env,
            "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        }
        printed = await run(gcloud, "auth", "print-access-token", env=gcloud_env)
        assert printed.stdout.strip() in google.iam.issued_access, printed.describe()
        listed = (await run(gcloud, "config", "list", "--format=json", env=gcloud_env)).json()
        assert listed["core"]["account"] == DEFAULT_SERVICE_ACCOUNT
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0

"""Python google-auth, unmodified, against a running broker.

Each client runs in a fresh interpreter: google-auth reads ``GCE_METADATA_HOST``
at import time and pings ``GCE_METADATA_IP`` (metadata-protocol.md §5.1, §7).
Scripts print one JSON object on stdout.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from broker.fakes import FakeGoogle
from tests.clients._subproc import Completed, client_env, jwt_payload, run
from tests.conftest import PROJECT, SA, RunningBroker

pytestmark = pytest.mark.client

SVC_AUDIENCE = "https://svc.example.com"
READ_ONLY = "https://www.googleapis.com/auth/devstorage.read_only"

DEFAULT_SCRIPT = """
import json, sys
import google.auth
from google.auth import compute_engine
from google.auth.transport.requests import Request

scopes = json.loads(sys.argv[1])
creds, project = google.auth.default(scopes=scopes)
kind = f"{type(creds).__module__}.{type(creds).__qualname__}"
creds.refresh(Request())
print(json.dumps({
    "kind": kind,
    "is_compute_engine": type(creds) is compute_engine.Credentials,
    "project": project,
    "token": creds.token,
    "email": creds.service_account_email,
}))
"""

ID_TOKEN_SCRIPT = """
import json, sys
from google.auth.transport.requests import Request
from google.oauth2 import id_token

print(json.dumps({"token": id_token.fetch_id_token(Request(), sys.argv[1])}))
"""

NO_CREDENTIALS_SCRIPT = """
import json
import google.auth
from google.auth import exceptions

try:
    creds, project = google.auth.default()
except exceptions.DefaultCredentialsError as exc:
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"raised": None, "kind": type(creds).__name__, "project": project}))
"""


async def python(script: str, *args: str, env: dict[str, str]) -> Completed:
    return await run(sys.executable, "-c", script, *args, env=env)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_default_credentials_come_from_the_broker(
    broker: RunningBroker, google: FakeGoogle, gcloud_config: Path
) -> None:
    result = await python(DEFAULT_SCRIPT, "null", env=client_env(broker, gcloud_config))
    out = result.json()
    assert out["is_compute_engine"], f"got {out['kind']}{result.describe()}"
    assert out["project"] == PROJECT, result.describe()
    assert out["token"] in google.iam.issued_access, result.describe()
    assert out["email"] == SA, result.describe()


async def test_fetch_id_token_for_audience(
    broker: RunningBroker, google: FakeGoogle, gcloud_config: Path
) -> None:
    result = await python(ID_TOKEN_SCRIPT, SVC_AUDIENCE, env=client_env(broker, gcloud_config))
    token = result.json()["token"]
    assert jwt_payload(token).get("aud") == SVC_AUDIENCE, result.describe()
    assert token in google.iam.issued_id, result.describe()


async def test_explicit_scopes_reach_iam(
    broker: RunningBroker, google: FakeGoogle, gcloud_config: Path
) -> None:
    result = await python(DEFAULT_SCRIPT, f'["{READ_ONLY}"]', env=client_env(broker, gcloud_config))
    out = result.json()
    assert out["is_compute_engine"], f"got {out['kind']}{result.describe()}"
    assert out["token"] in google.iam.issued_access, result.describe()
    scopes = [
        (call.json or {}).get("scope")
        for call in google.iam.calls
        if call.path.endswith(":generateAccessToken")
    ]
    assert [READ_ONLY] in scopes, f"IAM saw scopes {scopes}{result.describe()}"


@pytest.mark.parametrize("control", ["closed-port", "no-gce-check"])
async def test_without_the_broker_default_raises(
    control: str, broker: RunningBroker, gcloud_config: Path
) -> None:
    """Negative control: the positive tests pass only because the broker answers."""
    env = client_env(broker, gcloud_config)
    if control == "closed-port":
        dead = f"127.0.0.1:{closed_port()}"
        env.update(GCE_METADATA_HOST=dead, GCE_METADATA_IP=dead, GCE_METADATA_ROOT=dead)
    else:
        env["NO_GCE_CHECK"] = "true"
    result = await python(NO_CREDENTIALS_SCRIPT, env=env)
    out = result.json()
    # On a real GCE host the ping failure would fall back to the DMI product name.
    assert out["raised"] == "DefaultCredentialsError", f"default() returned {out}{result.describe()}"

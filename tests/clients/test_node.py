"""Node ``gcp-metadata`` and ``google-auth-library``, unmodified, against a running broker.

Versions are pinned in ``tests/clients/node/package-lock.json`` and installed
with ``npm ci`` by ``scripts/install-clients``. Node finds the broker through
``GCE_METADATA_IP`` / ``GCE_METADATA_HOST`` and probes
``/computeMetadata/v1/instance`` before trusting it (metadata-protocol.md §5.3).
``probe.js`` prints one JSON object; each test checks one part of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.fakes import FakeGoogle
from tests.clients._storage import BUCKET, OBJECT, fake_gcs
from tests.clients._subproc import Completed, client_env, jwt_payload, run
from tests.clients._toolchains import require_node_modules
from tests.conftest import PROJECT, SA, ZONE, RunningBroker, require_tool
from tests.fakes.gcs import FakeGcs

pytestmark = pytest.mark.client

SVC_AUDIENCE = "https://svc.example.com"


@pytest.fixture
async def gcs(google: FakeGoogle) -> AsyncIterator[FakeGcs]:
    async with fake_gcs(google) as fake:
        yield fake


async def probe(broker: RunningBroker, gcs: FakeGcs, tmp_path: Path) -> tuple[dict[str, Any], Completed]:
    node_dir = require_node_modules()
    env = client_env(broker, tmp_path / "gcloud")
    # No well-known ADC file, no detection override: only the metadata server can answer.
    env["HOME"] = str(tmp_path)
    env.pop("METADATA_SERVER_DETECTION", None)
    result = await run(
        require_tool("node"),
        str(node_dir / "probe.js"),
        SVC_AUDIENCE,
        f"{gcs.url}/storage/v1/b/{BUCKET}/o",
        env=env,
    )
    return result.json(), result


async def test_gcp_metadata_detects_and_reads_the_broker(
    broker: RunningBroker, gcs: FakeGcs, tmp_path: Path
) -> None:
    out, result = await probe(broker, gcs, tmp_path)
    assert out["isAvailable"] is True, result.describe()
    assert out["zone"] == f"projects/123456789012/zones/{ZONE}", result.describe()
    assert out["email"] == SA, result.describe()


async def test_google_auth_library_project_and_access_token(
    broker: RunningBroker, google: FakeGoogle, gcs: FakeGcs, tmp_path: Path
) -> None:
    out, result = await probe(broker, gcs, tmp_path)
    assert out["clientKind"] == "Compute", result.describe()
    assert out["projectId"] == PROJECT, result.describe()
    assert out["accessToken"] in google.iam.issued_access, result.describe()


async def test_google_auth_library_id_token_for_audience(
    broker: RunningBroker, google: FakeGoogle, gcs: FakeGcs, tmp_path: Path
) -> None:
    out, result = await probe(broker, gcs, tmp_path)
    token = out["idToken"]
    assert jwt_payload(token).get("aud") == SVC_AUDIENCE, result.describe()
    assert token in google.iam.issued_id, result.describe()


async def test_google_auth_library_request_reaches_storage(
    broker: RunningBroker, google: FakeGoogle, gcs: FakeGcs, tmp_path: Path
) -> None:
    out, result = await probe(broker, gcs, tmp_path)
    assert out["storage"] == {"status": 200, "names": [OBJECT, "top-level.txt"]}, result.describe()
    assert set(gcs.bearers) == {out["accessToken"]}, result.describe()

"""Go ``cloud.google.com/go/compute/metadata`` and ``golang.org/x/oauth2/google``, unmodified.

Built offline from Debian bookworm's packaged sources
(``golang-google-cloud-compute-metadata-dev``, ``golang-golang-x-oauth2-google-dev``;
installed by ``scripts/install-clients``) in GOPATH mode with ``GOPROXY=off``,
once per test session. ``GCE_METADATA_HOST`` makes Go treat the host as GCE
without a probe (metadata-protocol.md §5.2). ``probe`` prints one JSON object;
each test checks one part of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.fakes import FakeGoogle
from tests.clients._storage import BUCKET, OBJECT, fake_gcs
from tests.clients._subproc import Completed, client_env, jwt_payload, run
from tests.clients._toolchains import build_go_probe
from tests.conftest import PROJECT, SA, ZONE, RunningBroker
from tests.fakes.gcs import FakeGcs

pytestmark = pytest.mark.client

SVC_AUDIENCE = "https://svc.example.com"


@pytest.fixture(scope="session")
def go_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Session scope, so it is built before any broker starts: a blocking build is fine here.
    return build_go_probe(tmp_path_factory.mktemp("go-probe"))


@pytest.fixture
async def gcs(google: FakeGoogle) -> AsyncIterator[FakeGcs]:
    async with fake_gcs(google) as fake:
        yield fake


async def probe(
    go_probe: Path, broker: RunningBroker, gcs: FakeGcs, tmp_path: Path
) -> tuple[dict[str, Any], Completed]:
    env = client_env(broker, tmp_path / "gcloud")
    env["HOME"] = str(tmp_path)  # no well-known ADC file to find
    result = await run(str(go_probe), SVC_AUDIENCE, f"{gcs.url}/storage/v1/b/{BUCKET}/o", env=env)
    return result.json(), result


async def test_compute_metadata_detects_and_reads_the_broker(
    go_probe: Path, broker: RunningBroker, gcs: FakeGcs, tmp_path: Path
) -> None:
    out, result = await probe(go_probe, broker, gcs, tmp_path)
    assert out["onGCE"] is True, result.describe()
    assert out["projectId"] == PROJECT, result.describe()
    assert out["zone"] == ZONE, result.describe()
    assert out["email"] == SA, result.describe()


async def test_oauth2_default_and_compute_token_sources(
    go_probe: Path, broker: RunningBroker, google: FakeGoogle, gcs: FakeGcs, tmp_path: Path
) -> None:
    out, result = await probe(go_probe, broker, gcs, tmp_path)
    assert out["defaultCredentialsProject"] == PROJECT, result.describe()
    assert out["tokenType"] == "Bearer", result.describe()
    assert out["defaultCredentialsToken"] in google.iam.issued_access, result.describe()
    assert out["computeToken"] in google.iam.issued_access, result.describe()


async def test_compute_metadata_identity_token_for_audience(
    go_probe: Path, broker: RunningBroker, google: FakeGoogle, gcs: FakeGcs, tmp_path: Path
) -> None:
    out, result = await probe(go_probe, broker, gcs, tmp_path)
    token = out["idToken"]
    assert jwt_payload(token).get("aud") == SVC_AUDIENCE, result.describe()
    assert token in google.iam.issued_id, result.describe()


async def test_oauth2_client_request_reaches_storage(
    go_probe: Path, broker: RunningBroker, google: FakeGoogle, gcs: FakeGcs, tmp_path: Path
) -> None:
    out, result = await probe(go_probe, broker, gcs, tmp_path)
    assert out["storage"] == {"status": 200, "names": [OBJECT, "top-level.txt"]}, result.describe()
    assert set(gcs.bearers) == {out["defaultCredentialsToken"]}, result.describe()

"""Python ``google-cloud-storage``, unmodified, reading a bucket with the broker's token.

``storage.Client()`` takes credentials and project from ``google.auth.default()``,
that is from the metadata server. The fake Cloud Storage is reached through
``client_options={"api_endpoint": ...}``, not ``STORAGE_EMULATOR_HOST``: the
emulator variable switches the client to anonymous credentials, which would
bypass the broker.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.fakes import FakeGoogle
from tests.clients._storage import BUCKET, CONTENT, OBJECT, fake_gcs
from tests.clients._subproc import client_env, run
from tests.clients._toolchains import require_module
from tests.conftest import PROJECT, SA, RunningBroker
from tests.fakes.gcs import FakeGcs

pytestmark = pytest.mark.client

SCRIPT = """
import json, sys
from google.cloud import storage

endpoint, bucket, name = sys.argv[1:4]
client = storage.Client(client_options={"api_endpoint": endpoint})
names = [blob.name for blob in client.list_blobs(bucket)]
data = client.bucket(bucket).blob(name).download_as_bytes()
creds = client._credentials
print(json.dumps({
    "project": client.project,
    "credentials": f"{type(creds).__module__}.{type(creds).__qualname__}",
    "email": getattr(creds, "service_account_email", None),
    "token": creds.token,
    "names": names,
    "data": data.decode(),
}))
"""


@pytest.fixture
async def gcs(google: FakeGoogle) -> AsyncIterator[FakeGcs]:
    async with fake_gcs(google) as fake:
        yield fake


async def test_storage_client_lists_and_downloads_with_broker_token(
    broker: RunningBroker, google: FakeGoogle, gcs: FakeGcs, gcloud_config: Path
) -> None:
    require_module("google.cloud.storage")
    env = client_env(broker, gcloud_config)
    env.pop("STORAGE_EMULATOR_HOST", None)
    result = await run(sys.executable, "-c", SCRIPT, gcs.url, BUCKET, OBJECT, env=env)
    out = result.json()
    assert out["credentials"] == "google.auth.compute_engine.credentials.Credentials", result.describe()
    assert out["project"] == PROJECT, result.describe()
    assert out["email"] == SA, result.describe()
    assert out["names"] == sorted([OBJECT, "top-level.txt"]), result.describe()
    assert out["data"] == CONTENT.decode(), result.describe()
    assert out["token"] in google.iam.issued_access, result.describe()
    assert gcs.bearers, result.describe()
    assert set(gcs.bearers) == {out["token"]}, result.describe()
    paths = [call.path for call in gcs.calls]
    assert f"/storage/v1/b/{BUCKET}/o" in paths, result.describe()
    assert f"/download/storage/v1/b/{BUCKET}/o/{OBJECT}" in paths, result.describe()

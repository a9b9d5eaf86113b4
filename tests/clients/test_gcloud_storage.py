"""``gcloud storage`` and ``gsutil``, unmodified, listing a bucket with the broker's token.

The fake Cloud Storage accepts only bearer tokens the fake IAM issued, so a
listing that comes back proves the whole path: metadata-server detection,
token fetch from the broker, and the token on a real API call.

- ``gcloud storage`` honours ``api_endpoint_overrides/storage``
  (``CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE``, read in
  ``googlecloudsdk/api_lib/storage/gcs_json/client.py``), plain HTTP is fine.
- ``gsutil`` builds ``https://`` + ``[Credentials] gs_json_host:gs_json_port``
  (``gslib/gcs_json_api.py``), so its fake serves TLS with a throw-away
  certificate that the boto config trusts (``ca_certificates_file``). The
  gcloud wrapper tells gsutil to take GCE credentials from the metadata server
  (``GoogleCompute:service_account=default``) once it has seen the account
  there; gsutil's own metadata calls use ``GCE_METADATA_ROOT``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.fakes import FakeGoogle
from tests.clients._storage import BUCKET, OBJECT, fake_gcs, loopback_tls
from tests.clients._subproc import Completed, client_env, run
from tests.conftest import PROJECT, RunningBroker, require_tool
from tests.fakes.gcs import FakeGcs

pytestmark = pytest.mark.client


def gcloud_env(broker: RunningBroker, config_dir: Path) -> dict[str, str]:
    env = client_env(broker, config_dir)
    env.update(
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
        CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
        # Other suites share the CPU: a slow first answer must not read as "not on GCE".
        CLOUDSDK_COMPUTE_GCE_METADATA_CHECK_TIMEOUT_SEC="20",
    )
    return env


def assert_bearers_were_issued(gcs: FakeGcs, google: FakeGoogle, result: Completed) -> None:
    assert gcs.bearers, f"no request reached the fake GCS with a bearer token{result.describe()}"
    foreign = [token for token in gcs.bearers if token not in google.iam.issued_access]
    assert not foreign, f"fake GCS saw tokens IAM never issued: {foreign}{result.describe()}"


@pytest.fixture
async def gcs(google: FakeGoogle) -> AsyncIterator[FakeGcs]:
    async with fake_gcs(google) as fake:
        yield fake


@pytest.fixture
async def gcs_tls(google: FakeGoogle, tmp_path: Path) -> AsyncIterator[tuple[FakeGcs, Path]]:
    context, cert = loopback_tls(tmp_path)
    async with fake_gcs(google, context) as fake:
        yield fake, cert


async def test_gcloud_storage_ls_lists_bucket_with_broker_token(
    broker: RunningBroker, google: FakeGoogle, gcs: FakeGcs, gcloud_config: Path
) -> None:
    env = gcloud_env(broker, gcloud_config)
    env["CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE"] = f"{gcs.url}/storage/v1/"
    result = await run(require_tool("gcloud"), "storage", "ls", f"gs://{BUCKET}", env=env)
    listed = result.stdout.split()
    assert f"gs://{BUCKET}/top-level.txt" in listed, result.describe()
    assert f"gs://{BUCKET}/{OBJECT.split('/')[0]}/" in listed, result.describe()
    assert any(call.path == f"/storage/v1/b/{BUCKET}/o" for call in gcs.calls), result.describe()
    assert_bearers_were_issued(gcs, google, result)


async def test_gsutil_ls_lists_bucket_with_broker_token(
    broker: RunningBroker,
    google: FakeGoogle,
    gcs_tls: tuple[FakeGcs, Path],
    gcloud_config: Path,
    tmp_path: Path,
) -> None:
    gsutil = require_tool("gsutil")
    gcs, cert = gcs_tls
    state = tmp_path / "gsutil-state"
    boto = tmp_path / "boto.cfg"
    boto.write_text(
        "[Credentials]\n"
        "gs_json_host = 127.0.0.1\n"
        f"gs_json_port = {gcs.port}\n"
        "[Boto]\n"
        f"ca_certificates_file = {cert}\n"
        "num_retries = 1\n"
        "max_retry_delay = 1\n"
        "[GSUtil]\n"
        f"state_dir = {state}\n"
        "software_update_check_period = 0\n"
        f"default_project_id = {PROJECT}\n"
    )
    env = gcloud_env(broker, gcloud_config)
    env.update(BOTO_CONFIG=str(boto), HOME=str(tmp_path))
    env.pop("BOTO_PATH", None)
    result = await run(gsutil, "ls", f"gs://{BUCKET}", env=env)
    listed = result.stdout.split()
    assert f"gs://{BUCKET}/top-level.txt" in listed, result.describe()
    assert any(call.path == f"/storage/v1/b/{BUCKET}/o" for call in gcs.calls), result.describe()
    assert_bearers_were_issued(gcs, google, result)

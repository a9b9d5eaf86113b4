"""The real ``gcloud`` CLI, unmodified, against a running broker.

gcloud finds the metadata server through ``GCE_METADATA_ROOT`` (its own lookups)
and ``GCE_METADATA_HOST`` (its vendored google-auth), and caches "on GCE?" in
``$CLOUDSDK_CONFIG/gce``; every test gets a fresh config dir
(metadata-protocol.md §5.6, §7).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import metrics
from broker.fakes import FakeGoogle, Recorded
from tests.clients._subproc import Completed, client_env, jwt_payload, run
from tests.conftest import PROJECT, SA, RunningBroker, require_tool

pytestmark = pytest.mark.client

GCLOUD_AUDIENCE = "32555940559.apps.googleusercontent.com"
SVC_AUDIENCE = "https://svc.example.com"


def gcloud_env(broker: RunningBroker, config_dir: Path) -> dict[str, str]:
    env = client_env(broker, config_dir)
    env.update(
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        # Keep gcloud offline apart from the broker: no update check, no usage report.
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
        CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
    )
    return env


async def gcloud(env: dict[str, str], *args: str) -> Completed:
    return await run(require_tool("gcloud"), *args, env=env)


def token_responses() -> float:
    """2xx answers the broker's token endpoint has sent (process-wide counter)."""
    sample = metrics.REGISTRY.get_sample_value(
        "wif_broker_requests_total", {"endpoint": metrics.Endpoint.TOKEN.value, "status": "2xx"}
    )
    return sample or 0.0


def iam_calls(google: FakeGoogle, method: str) -> list[Recorded]:
    return [call for call in google.iam.calls if call.path.endswith(f":{method}")]


async def test_config_list_reports_account_and_project(broker: RunningBroker, gcloud_config: Path) -> None:
    require_tool("gcloud")
    result = await gcloud(gcloud_env(broker, gcloud_config), "config", "list", "--format=json")
    core = result.json().get("core", {})
    assert core.get("account") == SA, result.describe()
    assert core.get("project") == PROJECT, result.describe()


async def test_auth_list_marks_service_account_active(broker: RunningBroker, gcloud_config: Path) -> None:
    require_tool("gcloud")
    result = await gcloud(gcloud_env(broker, gcloud_config), "auth", "list", "--format=json")
    accounts = {entry["account"]: entry["status"] for entry in result.json()}
    assert accounts.get(SA) == "ACTIVE", result.describe()


async def test_print_access_token_is_minted_by_iam(
    broker: RunningBroker, google: FakeGoogle, gcloud_config: Path
) -> None:
    require_tool("gcloud")
    result = await gcloud(gcloud_env(broker, gcloud_config), "auth", "print-access-token")
    token = result.stdout.strip()
    assert result.stdout == token + "\n", result.describe()
    assert token in google.iam.issued_access, result.describe()


async def test_print_identity_token_for_audience(
    broker: RunningBroker, google: FakeGoogle, gcloud_config: Path
) -> None:
    require_tool("gcloud")
    result = await gcloud(
        gcloud_env(broker, gcloud_config), "auth", "print-identity-token", f"--audiences={SVC_AUDIENCE}"
    )
    token = result.stdout.strip()
    assert jwt_payload(token).get("aud") == SVC_AUDIENCE, result.describe()
    assert token in google.iam.issued_id, result.describe()


async def test_second_gcloud_reuses_broker_cached_token(
    broker: RunningBroker, google: FakeGoogle, tmp_path: Path
) -> None:
    """Two gcloud runs, one upstream mint: the broker, not gcloud, cached the token.

    Each run gets its own CLOUDSDK_CONFIG, so gcloud's on-disk access-token cache
    cannot answer the second run: it must ask the broker's token endpoint again,
    and the broker must answer from its cache without calling IAM.
    """
    require_tool("gcloud")
    tokens = []
    for name in ("first", "second"):
        config_dir = tmp_path / name
        config_dir.mkdir()
        served_before = token_responses()
        result = await gcloud(gcloud_env(broker, config_dir), "auth", "print-access-token")
        tokens.append(result.stdout.strip())
        assert token_responses() > served_before, f"{name} run never hit the broker{result.describe()}"
        minted = iam_calls(google, "generateAccessToken")
        assert len(minted) == 1, f"{name} run: {len(minted)} generateAccessToken calls{result.describe()}"
    assert tokens[0] == tokens[1]
    assert tokens[0] in google.iam.issued_access


async def test_gcloud_own_identity_request_is_served(
    broker: RunningBroker, google: FakeGoogle, gcloud_config: Path
) -> None:
    """gcloud asks for an ID token for its own client id on every refresh (§1.7); it must not break."""
    require_tool("gcloud")
    result = await gcloud(gcloud_env(broker, gcloud_config), "auth", "print-access-token")
    assert result.stdout.strip() in google.iam.issued_access, result.describe()
    audiences = [(call.json or {}).get("audience") for call in iam_calls(google, "generateIdToken")]
    assert GCLOUD_AUDIENCE in audiences, f"IAM saw ID-token audiences {audiences}{result.describe()}"

"""Each recognisable upstream failure maps to a fix an operator can act on.

The fakes answer with the real error bodies of token-chain.md §A.6 and §B.3;
the broker's token endpoint must carry the step, the upstream reason and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from broker import diagnosis, settings
from broker.errors import ConfigError, Denied, Step
from broker.fakes import FakeGoogle
from tests.conftest import AUDIENCE, SA, run_broker

TOKEN = "/computeMetadata/v1/instance/service-accounts/default/token"
SUBJECT_MEMBER = (
    "principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
    "wif-broker-demo/subject/system:serviceaccount:default:app"
)


async def token_error(broker_url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(broker_url + TOKEN, headers={"Metadata-Flavor": "Google"}) as resp,
    ):
        return resp.status, await resp.text()


STS_CASES: list[tuple[str, dict[str, Any], int, list[str]]] = [
    (
        "audience",
        {
            "error": "invalid_grant",
            "error_description": "The audience in ID Token [x] does not match the expected audience.",
        },
        403,
        [
            "sts failed (HTTP 400): invalid_grant",
            "aud 'x' is not an allowed audience",
            "--allowed-audiences=x",
        ],
    ),
    (
        "issuer",
        {
            "error": "invalid_grant",
            "error_description": "The issuer in ID Token [https://a] does not match the expected ones.",
        },
        403,
        ["iss 'https://a' is not the issuer URI", "--issuer-uri=https://a"],
    ),
    (
        "attribute condition",
        {
            "error": "invalid_grant",
            "error_description": "The given credential is rejected by the attribute condition.",
        },
        403,
        ["attribute condition of provider", "--format='value(attributeCondition)'"],
    ),
    (
        "expired",
        {"error": "invalid_grant", "error_description": "ID Token issued at 1 is stale to sign-in."},
        403,
        ["the subject token expired at ", "(never subPath)"],
    ),
    (
        "aws signature",
        {
            "error": "invalid_grant",
            "error_description": (
                "Received invalid AWS response of type InvalidClientTokenId with error message: "
                "The security token included in the request is invalid."
            ),
        },
        403,
        ["AWS refused the signed GetCallerIdentity"],
    ),
    (
        "invalid_target",
        {
            "error": "invalid_target",
            "error_description": 'The target service indicated by the "audience" parameters is invalid.',
        },
        403,
        ["is disabled or deleted", "--no-disabled"],
    ),
    (
        "transient",
        {"error": "temporarily_unavailable", "error_description": "backend error"},
        503,
        ["sts failed (HTTP 503)"],
    ),
]


@pytest.mark.parametrize(("name", "body", "status", "expected"), STS_CASES, ids=[c[0] for c in STS_CASES])
async def test_sts_failures_are_explained(
    google: FakeGoogle,
    make_settings: Callable[..., settings.Settings],
    name: str,
    body: dict[str, Any],
    status: int,
    expected: list[str],
) -> None:
    google.sts.fail_next(503 if status == 503 else 400, body, count=20)
    async with run_broker(make_settings()) as broker:
        got_status, text = await token_error(broker.url)
    assert got_status == status, text
    for fragment in expected:
        assert fragment in text, (name, text)


async def test_iam_denial_names_the_exact_binding(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    google.iam.service_accounts.clear()
    async with run_broker(make_settings()) as broker:
        status, text = await token_error(broker.url)
    assert status == 403
    assert (
        f"gcloud iam service-accounts add-iam-policy-binding {SA} --role=roles/iam.workloadIdentityUser "
        f"--member='{SUBJECT_MEMBER}'"
    ) in text


async def test_iam_scope_insufficient_is_explained(
    google: FakeGoogle, make_settings: Callable[..., settings.Settings]
) -> None:
    body = {
        "error": {
            "code": 403,
            "message": "Request had insufficient authentication scopes.",
            "status": "PERMISSION_DENIED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                }
            ],
        }
    }
    google.iam.fail_next(403, body, count=20)
    async with run_broker(make_settings()) as broker:
        status, text = await token_error(broker.url)
    assert status == 403
    assert "lacks the cloud-platform scope" in text


def test_project_id_instead_of_number_is_refused_at_start_up(cred_file: Any) -> None:
    wrong = AUDIENCE.replace("123456789012", "my-project")
    with pytest.raises(
        ConfigError, match="audience: names project 'my-project'; provider audiences use the project NUMBER"
    ):
        settings.build({"audience": wrong, "source": "file:/dev/null"}, environ={})


@pytest.mark.parametrize(
    ("context", "member"),
    [
        (diagnosis.Context(AUDIENCE, SA, subject=diagnosis.Subject(sub="abc")), "subject/abc"),
        (diagnosis.Context(AUDIENCE, SA, member="principalSet://x/attribute.aws_role/R"), "aws_role/R"),
        (
            diagnosis.Context(AUDIENCE, SA, aws=True),
            "attribute.aws_role/arn:aws:sts::ACCOUNT:assumed-role/ROLE",
        ),
        (diagnosis.Context(AUDIENCE, SA), "/subject/SUBJECT"),
    ],
)
def test_the_member_is_the_narrowest_known_never_the_pool(context: diagnosis.Context, member: str) -> None:
    """Without a subject (run, AWS) the fix names the shape of the narrow member, never ``/*``."""
    denied = Denied(
        Step.IAM_ACCESS, "PERMISSION_DENIED: denied", code="PERMISSION_DENIED", upstream_status=403
    )
    fix = diagnosis.explain(denied, context).fix
    assert fix.endswith(member + "'")
    assert "/*" not in fix


def test_times_are_iso_8601_utc() -> None:
    assert diagnosis.iso(0) == "1970-01-01T00:00:00Z"

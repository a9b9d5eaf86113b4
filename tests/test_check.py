"""``wif-broker check`` as a real process against the fake upstreams."""

from __future__ import annotations

from pathlib import Path

from broker.fakes import FakeGoogle
from tests.clients._subproc import check_process
from tests.conftest import SA

MEMBER = (
    "principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
    "wif-broker-demo/subject/system:serviceaccount:default:app"
)


async def test_check_passes_and_shows_what_each_step_saw(google: FakeGoogle, cred_file: Path) -> None:
    result = await check_process(cred_file)
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, out + err
    assert "ok    native identity (file): path=" in out
    assert "iss=https://oidc.fake.wif-broker.invalid" in out
    assert "sub=system:serviceaccount:default:app" in out
    assert "ok    STS token exchange" in out
    assert f"ok    generateAccessToken for {SA}" in out
    assert f"email={SA}" in out
    issued = [*google.sts.issued, *google.iam.issued_access, *google.iam.issued_id]
    assert issued
    for token in issued:
        assert token not in out
        assert token not in err


async def test_check_explains_an_iam_denial(google: FakeGoogle, cred_file: Path) -> None:
    google.iam.service_accounts.clear()
    result = await check_process(cred_file)
    code, out = result.returncode, result.stdout
    assert code == 1
    assert "ok    STS token exchange" in out
    assert "FAIL  generateAccessToken: PERMISSION_DENIED" in out
    assert (
        f"fix: {MEMBER} may not impersonate as {SA}\n"
        f"      gcloud iam service-accounts add-iam-policy-binding {SA} "
        "--role=roles/iam.workloadIdentityUser "
        f"--member='{MEMBER}'\n"
    ) in out

"""From an upstream's answer to the operator's fix.

STS and IAM say what failed, not what to change. This maps the recognisable
failures of reference/token-chain.md §A.6, §B.3 to the setting or IAM binding
to fix, filled in with this broker's own audience, pool and service account so
the command can be pasted as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.errors import BrokerError, Step

_POOL = re.compile(
    r"^//iam\.googleapis\.com/(projects/\d+/locations/[^/]+/workloadIdentityPools/[^/]+)/providers/"
)


@dataclass(frozen=True, slots=True)
class Context:
    audience: str
    service_account: str  # "" without impersonation

    @property
    def pool(self) -> str:
        match = _POOL.match(self.audience)
        return (
            match.group(1) if match else "projects/PROJECT_NUMBER/locations/global/workloadIdentityPools/POOL"
        )

    @property
    def provider(self) -> str:
        return self.audience.removeprefix("//iam.googleapis.com/")

    def pool_member(self) -> str:
        return f"principalSet://iam.googleapis.com/{self.pool}/*"


def explain(exc: BrokerError, ctx: Context) -> BrokerError:
    fix = _fix(exc, ctx)
    return exc.with_fix(fix) if fix else exc


def _fix(exc: BrokerError, ctx: Context) -> str:
    reason = exc.reason.lower()
    if exc.step is Step.STS and exc.code == "invalid_grant":
        if "invalidclienttokenid" in reason or "signaturedoesnotmatch" in reason or "expiredtoken" in reason:
            return (
                "AWS refused the signed GetCallerIdentity Google replayed: the AWS credentials are invalid "
                "or expired, or this host's clock is skewed"
            )
        if "audience" in reason or "aud" in reason.split():
            return (
                f"the subject token's aud is not accepted by the provider: mint it for {ctx.audience!r} "
                f"(or https:{ctx.audience}), or add its aud with 'gcloud iam workload-identity-pools "
                f"providers update-oidc ... --allowed-audiences=AUD' on {ctx.provider}"
            )
        if "issuer" in reason or "iss" in reason.split():
            return (
                "the token's iss does not match the provider's issuer URI (Azure: v1 tokens are issued by "
                "https://sts.windows.net/TENANT/, v2 by https://login.microsoftonline.com/TENANT/v2.0)"
            )
        if "condition" in reason:
            return (
                "the provider's attribute condition rejected this identity: compare it with what "
                "'wif-broker check' shows "
                f"(gcloud iam workload-identity-pools providers describe {ctx.provider})"
            )
        if "expired" in reason or "stale" in reason or "exp" in reason.split():
            return (
                "the subject token has expired: make sure the token file is rotated (a projected volume "
                "mounted without subPath) and keep exp - iat under 48 h"
            )
    if exc.step in (Step.IAM_ACCESS, Step.IAM_ID) and exc.code == "PERMISSION_DENIED":
        if "access_token_scope_insufficient" in reason:
            return "the federated token lacks the cloud-platform scope; check token_url points at Google STS"
        return (
            "let the federated identity impersonate the service account: gcloud iam service-accounts "
            f"add-iam-policy-binding {ctx.service_account or 'SA_EMAIL'} "
            f"--role=roles/iam.workloadIdentityUser --member='{ctx.pool_member()}' "
            "(or a narrower principal:// or attribute member)"
        )
    if exc.step in (Step.IAM_ACCESS, Step.IAM_ID) and exc.code == "NOT_FOUND":
        return f"service account {ctx.service_account} does not exist: check the impersonation URL"
    return ""

"""From an upstream's answer to the operator's fix: the one place fix text is written.

STS and IAM say what failed, not what to change. This maps the twelve failures
of SPEC §11 (real bodies: reference/token-chain.md §A.6, §B.3) to the setting,
binding or command to fix, filled in with this broker's own provider, service
account and the identity it presented, so each command pastes as it is. The
metadata server's 403/503 bodies, the log lines and ``wif-broker check`` all
print what :func:`explain` returns.

Rules: the member to bind is always the narrowest one known (a subject's
``principal://`` or an AWS role's ``principalSet://…/attribute.aws_role/``),
never the whole pool; times are ISO-8601 UTC; each command is one line.
A fix is lines joined by newlines: facts first, then one command per line.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from broker.errors import BrokerError, Step

_PROVIDER = re.compile(
    r"^//iam\.googleapis\.com/projects/(?P<number>[^/]+)/locations/(?P<location>[^/]+)"
    r"/workloadIdentityPools/(?P<pool>[^/]+)/providers/(?P<provider>[^/]+)$"
)
_BRACKETED = re.compile(r"\[([^\]]*)\]")
_UNREACHABLE = re.compile(r"^(?:cannot reach|timed out talking to) (\S+?):?(?: |$)")
WORKLOAD_IDENTITY_USER = "roles/iam.workloadIdentityUser"

# Fixes the sources attach where they classify a native-identity failure (they
# hold the facts); written here with the rest. Azure's, which need the
# identity's own ids, are still in sources/azure_errors.py.
HOP_LIMIT_FIX = (
    "if this runs in a container on EC2, IMDSv2 needs a hop limit of 2:\n"
    "aws ec2 modify-instance-metadata-options --instance-id ID --http-put-response-hop-limit 2"
)
NO_ROLE_FIX = "run with an IAM role (task role, IRSA, Pod Identity or instance profile)"
IRSA_FIX = (
    "check the role's trust policy (the cluster's OIDC provider, sub and aud sts.amazonaws.com) "
    "and that the web identity token file is the projected token EKS mounts"
)
AWS_CLOCK_FIX = "check the clock (timedatectl) and the credential provider's health"
AWS_REGION_FIX = "set AWS_REGION (ECS and EKS usually inject it) or region_url in the credential file"
TOKEN_FILE_FIX = "mount the projected service-account token at that path (not with subPath)"
TOKEN_FIELD_FIX = "check credential_source.format.subject_token_field_name"
NO_SERVICE_ACCOUNT_FIX = "set service-account (or service_account_impersonation_url in the credential file)"
TOKEN_CREATOR = "roles/iam.serviceAccountTokenCreator"


def iso(instant: float) -> str:
    """An epoch instant as ISO-8601 UTC, to the second."""
    return datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Subject:
    """The claims of the subject token a provider is configured against (never the token)."""

    iss: str = ""
    sub: str = ""
    aud: str = ""
    iat: float | None = None
    exp: float | None = None


@dataclass(frozen=True, slots=True)
class Context:
    """What the fixes are filled in with."""

    audience: str
    service_account: str  # "" without impersonation
    subject: Subject = Subject()
    member: str = ""  # the narrowest member when known otherwise (check's AWS role)
    now: float = 0.0
    aws: bool = False  # an aws1 provider: update-aws, and an aws_role member
    source_url: str = ""  # credential_source.url of a url source

    def _part(self, name: str, default: str) -> str:
        match = _PROVIDER.match(self.audience)
        return match.group(name) if match else default

    @property
    def number(self) -> str:
        return self._part("number", "PROJECT_NUMBER")

    @property
    def pool(self) -> str:
        """The pool's resource name, ``projects/N/locations/global/workloadIdentityPools/POOL``."""
        provider = self.provider
        return provider.split("/providers/")[0]

    @property
    def provider(self) -> str:
        """The provider's resource name: gcloud takes it whole, so no --project (id vs number)."""
        if _PROVIDER.match(self.audience):
            return self.audience.removeprefix("//iam.googleapis.com/")
        return "projects/PROJECT_NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER"

    def narrowest_member(self) -> str:
        """The member for exactly this identity; a template naming the blank when unknown."""
        if self.member:
            return self.member
        if self.subject.sub:
            return subject_member(self.audience, self.subject.sub)
        if self.aws:
            return f"principalSet://iam.googleapis.com/{self.pool}/attribute.aws_role/arn:aws:sts::ACCOUNT:assumed-role/ROLE"
        return f"principal://iam.googleapis.com/{self.pool}/subject/SUBJECT"


def subject_member(audience: str, sub: str) -> str:
    """The member for one subject, with the usual mapping ``google.subject=assertion.sub``."""
    pool = Context(audience, "").pool
    return f"principal://iam.googleapis.com/{pool}/subject/{sub}"


def explain(exc: BrokerError, ctx: Context) -> BrokerError:
    """The same error with the fix for it, or unchanged when this module knows no better."""
    fix = _fix(exc, ctx)
    return exc.with_fix(fix) if fix else exc


def _fix(exc: BrokerError, ctx: Context) -> str:
    reason = exc.reason.lower()
    if reason.startswith(("cannot reach ", "timed out talking to ")):
        return _unreachable(exc, ctx)
    if exc.step is Step.STS:
        return _sts(exc, ctx)
    if exc.step in (Step.IAM_ACCESS, Step.IAM_ID):
        return _iam(exc, ctx)
    if exc.step is Step.SUBJECT_TOKEN:
        return _subject_token(exc)
    return ""


def _unreachable(exc: BrokerError, ctx: Context) -> str:
    match = _UNREACHABLE.match(exc.reason)
    host = match.group(1) if match else "the upstream"
    name = host.rsplit(":", 1)[0].strip("[]")
    if exc.step is Step.SUBJECT_TOKEN and ctx.source_url:
        return (
            f"nothing answers at credential_source.url {ctx.source_url.split('?')[0]} from this host\n"
            "that URL is a token service of the machine the file was made for (Azure IMDS answers only "
            "inside an Azure VM or VMSS, and never through a proxy): run there, or use a source that "
            "works here (file, aws, azure)"
        )
    if exc.step not in (Step.STS, Step.IAM_ACCESS, Step.IAM_ID):
        return ""
    dns = "" if _is_ip(name) else f"DNS: does the name resolve here?\ngetent hosts {name}\n"
    return (
        f"{host} is unreachable from this host: {exc.reason.split(': ', 1)[-1]}\n"
        f"{dns}"
        f"firewall or egress policy: allow TCP to {host if ':' in host else host + ':443'}\n"
        "proxy: wif-broker connects directly and ignores HTTP(S)_PROXY; if only a proxy can reach "
        "Google, allow direct egress to this host (or a Private Service Connect endpoint in token_url)"
    )


def _sts(exc: BrokerError, ctx: Context) -> str:
    reason = exc.reason.lower()
    subject = ctx.subject
    provider = ctx.provider
    update = "update-aws" if ctx.aws else "update-oidc"
    command = f"gcloud iam workload-identity-pools providers {update} {provider}"
    if exc.code == "invalid_target":
        return (
            f"provider {provider} is disabled or deleted, or it or its pool does not exist\n"
            "see which (state DELETED, or disabled True), the provider and the pool:\n"
            f"gcloud iam workload-identity-pools providers describe {provider} "
            "--format='value(state,disabled)'\n"
            f"gcloud iam workload-identity-pools describe {ctx.pool} --format='value(state,disabled)'\n"
            "then enable the provider, the pool, or undelete the provider (within 30 days of deletion):\n"
            f"{command} --no-disabled\n"
            f"gcloud iam workload-identity-pools update {ctx.pool} --no-disabled\n"
            f"gcloud iam workload-identity-pools providers undelete {provider}"
        )
    if exc.code != "invalid_grant":
        if exc.code in ("invalid_request", "unauthorized_client"):
            return (
                f"STS refused the request's audience or subject_token_type for provider {provider}\n"
                "compare the credential file with:\n"
                f"gcloud iam workload-identity-pools providers describe {provider}"
            )
        return ""
    if any(code in reason for code in ("invalidclienttokenid", "signaturedoesnotmatch", "expiredtoken")):
        return (
            "AWS refused the signed GetCallerIdentity Google replayed: the AWS credentials are invalid "
            "or expired, or this host's clock is skewed"
        )
    if "audience" in reason:
        aud = _bracketed(exc.reason) or subject.aud or "AUD"
        return (
            f"the subject token's aud {aud!r} is not an allowed audience of provider {provider} "
            f"(with none configured it accepts {ctx.audience!r} and 'https:{ctx.audience}')\n"
            f"either mint the token for {ctx.audience} (a projected token's audience:), "
            "or allow its aud (this replaces the list):\n"
            f"{command} --allowed-audiences={aud}"
        )
    if "issuer" in reason:
        iss = _bracketed(exc.reason) or subject.iss or "ISSUER"
        return (
            f"the subject token's iss {iss!r} is not the issuer URI of provider {provider}\n"
            f"if {iss} is the issuer you trust:\n"
            f"{command} --issuer-uri={iss}"
        )
    if "attribute condition" in reason:
        seen = " ".join(f"{k}={v}" for k, v in (("iss", subject.iss), ("sub", subject.sub)) if v)
        return (
            f"the attribute condition of provider {provider} refused this identity"
            + (f" ({seen})" if seen else "")
            + "\n"
            "see the condition:\n"
            f"gcloud iam workload-identity-pools providers describe {provider} "
            "--format='value(attributeCondition)'\n"
            "change it so that it accepts this identity:\n"
            f"{command} --attribute-condition=CONDITION"
        )
    now = f"; now is {iso(ctx.now)}" if ctx.now else ""
    if "in the future" in reason or (subject.iat is not None and ctx.now and subject.iat > ctx.now + 300):
        issued = iso(subject.iat) if subject.iat is not None else "a time after now"
        return (
            f"the subject token is not yet valid: issued at {issued}{now}\n"
            "a clock is wrong (this host's or the token issuer's); see this host's and sync it:\n"
            "timedatectl status"
        )
    if "stale" in reason or "expired" in reason or (subject.exp is not None and subject.exp <= ctx.now):
        expired = f"expired at {iso(subject.exp)}" if subject.exp is not None else "has expired"
        return (
            f"the subject token {expired}{now}\n"
            "the token source is not refreshed: mount a projected service-account token as a directory "
            "(never subPath) so the kubelet's rotation reaches it, or rewrite the file before exp"
        )
    if "48 hours" in reason:
        return "the subject token lives 48 h or more (exp - iat): issue shorter-lived tokens"
    return ""


def _iam(exc: BrokerError, ctx: Context) -> str:
    reason = exc.reason.lower()
    account = ctx.service_account or "SA_EMAIL"
    info = exc.detail("reason")
    if info == "SERVICE_DISABLED":
        project = exc.detail("consumer").removeprefix("projects/") or ctx.number
        return (
            f"the IAM Service Account Credentials API is not enabled in project {project}\n"
            f"gcloud services enable iamcredentials.googleapis.com --project={project}"
        )
    if info == "ACCESS_TOKEN_SCOPE_INSUFFICIENT" or "access_token_scope_insufficient" in reason:
        return "the federated token lacks the cloud-platform scope; check token_url points at Google STS"
    if exc.code == "PERMISSION_DENIED":
        id_token = exc.step is Step.IAM_ID or exc.detail("permission").endswith("getOpenIdToken")
        role = TOKEN_CREATOR if id_token else WORKLOAD_IDENTITY_USER
        member = ctx.narrowest_member()
        blank = "" if ctx.member or ctx.subject.sub else " ('wif-broker check' prints this identity's member)"
        return (
            f"{member} may not {'sign ID tokens' if id_token else 'impersonate'} as {account}"
            f"{blank}\n"
            f"gcloud iam service-accounts add-iam-policy-binding {account} --role={role} --member='{member}'"
        )
    if exc.code == "NOT_FOUND":
        return f"service account {account} does not exist: check the impersonation URL"
    if exc.code == "INVALID_ARGUMENT":
        return "check token_lifetime_seconds (over 3600 needs an org policy exception)"
    if exc.code == "UNAUTHENTICATED":
        return "IAM refused the federated token: it may have expired, or token_url is not Google STS"
    return ""


def _subject_token(exc: BrokerError) -> str:
    if exc.code == "bad_request_102":
        return (
            "Azure IMDS refuses any other value: send the header 'Metadata: true', i.e. "
            'set "headers": {"Metadata": "true"} under credential_source in the credential file'
        )
    if exc.code == "invalid_resource":
        return "the resource in credential_source.url is not an Entra application ID URI"
    return ""


def metadata_header(value: str) -> str:
    """For a url source whose file says ``Metadata: True`` (hand-edited, or older gcloud)."""
    return (
        f"credential_source.headers has 'Metadata: {value}'; wif-broker sends 'true', but Azure IMDS "
        "answers 400 bad_request_102 to any other value, so other users of this file fail\n"
        'fix the file: "headers": {"Metadata": "true"}'
    )


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _bracketed(text: str) -> str:
    """What STS quotes of the token it saw, ``[...]``: that, not our guess, is what it refused."""
    match = _BRACKETED.search(text)
    return match.group(1) if match else ""

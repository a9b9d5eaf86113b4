"""AWS credentials and region via botocore, off the event loop.

Default: botocore's full credential chain — env, EKS IRSA (web identity), the
container provider (ECS task role, ``…_FULL_URI`` + authorization token file =
EKS Pod Identity), then EC2 IMDSv2. google-auth reads only env and IMDS, which is
why the same config fails on ECS and EKS (token-chain.md §D.6-D.7). ``strict``
keeps google-auth's behaviour: env, else IMDS at the file's URL.

Every function here blocks; callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.httpsession
import botocore.session
import botocore.utils
from botocore.awsrequest import AWSRequest

from broker.diagnosis import AWS_CLOCK_FIX, HOP_LIMIT_FIX, IRSA_FIX, NO_ROLE_FIX
from broker.errors import Step, Transient

# Regular and GovCloud/China region names at the start of an AZ or Local Zone
# name: "us-east-2b" → "us-east-2", "us-west-2-lax-1a" → "us-west-2".
_REGION_PREFIX = re.compile(r"^([a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d+)")
TRIED = "env, web identity (EKS IRSA), container (ECS task role / EKS Pod Identity), EC2 instance metadata"
STS_CLIENT_CONFIG = botocore.config.Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 2})


@dataclass(frozen=True, slots=True)
class FrozenCredentials:
    access_key: str
    secret_key: str
    token: str | None
    method: str  # botocore's provider name: env, iam-role, container-role, ...

    def __repr__(self) -> str:
        return f"FrozenCredentials(access_key={self.access_key[:4]}…, method={self.method})"


class CredentialChain:
    """Resolves once, then lets botocore's RefreshableCredentials rotate keys."""

    def __init__(self, strict_imds_url: str | None) -> None:
        self._session = botocore.session.get_session()
        # The web-identity (IRSA) STS client would otherwise wait 60 s per read: a hung
        # STS must not pin a worker thread, nor hold up the daemon's exit.
        self._session.set_default_client_config(STS_CLIENT_CONFIG)
        self._strict_imds_url = strict_imds_url
        self._credentials: botocore.credentials.Credentials | None = None

    def frozen(self) -> FrozenCredentials:
        try:
            if self._credentials is None:
                self._credentials = self._resolve()
            if self._credentials is None:
                raise _no_credentials(self._strict_imds_url)
            creds = self._credentials.get_frozen_credentials()
        except botocore.exceptions.BotoCoreError as exc:
            self._credentials = None  # start over next time: the environment may have changed
            raise _classify(exc) from None
        except botocore.exceptions.ClientError as exc:
            # Web identity (IRSA) calls STS lazily, here; a refusal is a ClientError, not a BotoCoreError.
            self._credentials = None
            raise _client_error(exc) from None
        except RuntimeError as exc:
            # botocore's "Credentials were refreshed, but the refreshed credentials are still expired."
            raise Transient(
                Step.AWS,
                f"AWS credentials expired and the provider ({self.method}) handed out no newer ones: {exc}",
                fix=AWS_CLOCK_FIX,
            ) from None
        return FrozenCredentials(creds.access_key or "", creds.secret_key or "", creds.token, self.method)

    @property
    def method(self) -> str:
        return str(getattr(self._credentials, "method", "unknown"))

    def _resolve(self) -> botocore.credentials.Credentials | None:
        if self._strict_imds_url is None:
            return self._session.get_credentials()
        parts = urlsplit(self._strict_imds_url)
        fetcher = botocore.utils.InstanceMetadataFetcher(
            base_url=f"{parts.scheme}://{parts.netloc}/", timeout=2, num_attempts=2
        )
        resolver = botocore.credentials.CredentialResolver(
            [botocore.credentials.EnvProvider(), botocore.credentials.InstanceMetadataProvider(fetcher)]
        )
        creds: botocore.credentials.Credentials | None = resolver.load_credentials()
        return creds


class _RegionFetcher(botocore.utils.IMDSFetcher):
    """botocore's IMDS plumbing (v2 token, endpoint env, retries) for two paths.

    botocore's own region fetcher strips the zone's last letter, which breaks
    Local Zones (``us-west-2-lax-1a``); ``placement/region`` is asked first.
    """

    def region(self) -> str | None:
        fetcher: Any = self  # the helpers used here are untyped in botocore-stubs
        token = fetcher._fetch_metadata_token()
        for path, from_zone in (
            ("latest/meta-data/placement/region", False),
            ("latest/meta-data/placement/availability-zone", True),
        ):
            try:
                text: str = fetcher._get_request(path, fetcher._default_retry, token).text.strip()
            except fetcher._RETRIES_EXCEEDED_ERROR_CLS:
                continue
            if text:
                return region_from_zone(text) if from_zone else text
        return None


def region_from_zone(zone: str) -> str:
    match = _REGION_PREFIX.match(zone)
    return match.group(1) if match else zone[:-1]


def _imds_config() -> dict[str, Any]:
    session = botocore.session.get_session()
    return {
        "ec2_metadata_service_endpoint": session.get_config_variable("ec2_metadata_service_endpoint"),
        "ec2_metadata_service_endpoint_mode": botocore.utils.resolve_imds_endpoint_mode(session),
    }


def imds_region(environ: Mapping[str, str]) -> str | None:
    """Region from EC2 IMDS (``placement/region``, else the zone), honouring botocore's env."""
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return None
    try:
        return _RegionFetcher(timeout=1, num_attempts=1, config=_imds_config()).region()
    except botocore.exceptions.BotoCoreError:
        return None


def _imds_base_url() -> str:
    """The IMDS endpoint botocore's chain uses (``AWS_EC2_METADATA_SERVICE_ENDPOINT[_MODE]``)."""
    config = _imds_config()
    if config["ec2_metadata_service_endpoint"]:
        return str(config["ec2_metadata_service_endpoint"])
    if config["ec2_metadata_service_endpoint_mode"] == "ipv6":
        return botocore.utils.METADATA_BASE_URL_IPv6
    return botocore.utils.METADATA_BASE_URL


def diagnose_imds(base_url: str) -> tuple[str, str]:
    """Why IMDS gave no credentials, and the fix: botocore's fetcher swallows the reason.

    One IMDSv2 token PUT and one role listing, 1 s each. A read timeout on the PUT
    is the classic symptom of a hop limit of 1 seen from a container.
    """
    base = base_url if base_url.endswith("/") else base_url + "/"
    host = urlsplit(base).netloc
    http = botocore.httpsession.URLLib3Session(timeout=1, proxies={})
    try:
        put = AWSRequest(
            "PUT", base + "latest/api/token", headers={"x-aws-ec2-metadata-token-ttl-seconds": "60"}
        )
        reply = http.send(put.prepare())
        headers = {"x-aws-ec2-metadata-token": reply.text} if reply.status_code == 200 else {}
        listing = AWSRequest("GET", base + "latest/meta-data/iam/security-credentials/", headers=headers)
        role = http.send(listing.prepare())
    except botocore.exceptions.ReadTimeoutError:
        return (
            f"EC2 instance metadata at {host} accepted the connection but did not answer in 1s",
            HOP_LIMIT_FIX,
        )
    except botocore.exceptions.ConnectTimeoutError:
        return f"EC2 instance metadata at {host} timed out (not on EC2?)", f"{NO_ROLE_FIX}; {HOP_LIMIT_FIX}"
    except botocore.exceptions.BotoCoreError:
        return f"EC2 instance metadata at {host} is unreachable (not on EC2)", NO_ROLE_FIX
    finally:
        http.close()
    if role.status_code == 404:
        return (
            f"EC2 instance metadata at {host} answers, but the instance has no IAM role",
            "attach an instance profile: aws ec2 associate-iam-instance-profile",
        )
    if role.status_code == 401:
        return (
            f"EC2 instance metadata at {host} refused the request without an IMDSv2 session token "
            f"(the token PUT answered HTTP {reply.status_code})",
            HOP_LIMIT_FIX,
        )
    return f"EC2 instance metadata at {host} answered HTTP {role.status_code}", NO_ROLE_FIX


def _no_credentials(strict_imds_url: str | None) -> Transient:
    tried = "env, EC2 instance metadata" if strict_imds_url else TRIED
    if strict_imds_url:
        parts = urlsplit(strict_imds_url)
        seen, fix = diagnose_imds(f"{parts.scheme}://{parts.netloc}/")
    elif os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        seen, fix = "EC2 instance metadata is disabled by AWS_EC2_METADATA_DISABLED", NO_ROLE_FIX
    else:
        seen, fix = diagnose_imds(_imds_base_url())
    return Transient(Step.AWS, f"no AWS credentials found; tried {tried}. {seen}", fix=fix)


def caller_arn(creds: FrozenCredentials, region: str) -> str:
    """The principal AWS sees (GetCallerIdentity), e.g. an assumed-role ARN."""
    client = botocore.session.get_session().create_client(
        "sts",
        region_name=region,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        aws_session_token=creds.token,
        config=STS_CLIENT_CONFIG,
    )
    sts: Any = client  # botocore-stubs types service methods only for boto3 clients
    try:
        arn: str = sts.get_caller_identity()["Arn"]
    except botocore.exceptions.ClientError as exc:
        raise Transient(
            Step.AWS, f"GetCallerIdentity failed: {exc.response.get('Error', {}).get('Code')}"
        ) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise Transient(Step.AWS, f"GetCallerIdentity failed: {type(exc).__name__}") from None
    return arn


_ASSUMED_ROLE = re.compile(r"^(arn:aws[\w-]*:sts::\d+:assumed-role/[^/]+)/.+$")


def principal_member(arn: str, audience: str) -> str:
    """The IAM member to grant roles/iam.workloadIdentityUser for this AWS principal.

    Google's default AWS mapping sets attribute.aws_role to the assumed-role ARN
    without the session name; anything else maps by subject (the full ARN).
    """
    pool = audience.removeprefix("//").split("/providers/")[0]
    match = _ASSUMED_ROLE.match(arn)
    if match:
        return f"principalSet://{pool}/attribute.aws_role/{match.group(1)}"
    return f"principal://{pool}/subject/{arn}"


def _client_error(exc: botocore.exceptions.ClientError) -> Transient:
    error = exc.response.get("Error", {})
    code, message = error.get("Code", "Unknown"), error.get("Message", "")
    fix = IRSA_FIX if exc.operation_name == "AssumeRoleWithWebIdentity" else ""
    if "expired" in f"{code} {message}".lower():
        fix = "the web identity token file holds an expired token: is the kubelet still rotating it?"
    return Transient(Step.AWS, f"{exc.operation_name} refused: {code}: {message[:300]}", fix=fix)


def _classify(exc: botocore.exceptions.BotoCoreError) -> Transient:
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError):
        return Transient(Step.AWS, f"timed out fetching AWS credentials ({name})", fix=HOP_LIMIT_FIX)
    if "expired" in text.lower():
        return Transient(Step.AWS, f"AWS credentials expired and could not be refreshed ({name})")
    return Transient(Step.AWS, f"cannot obtain AWS credentials: {name}: {text[:300]}")

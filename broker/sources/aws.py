"""AWS subject token: a freshly signed SigV4 ``GetCallerIdentity`` request.

Google STS replays the request to AWS, so it is signed per exchange (never
cached: AWS rejects stale ``x-amz-date``). ``x-goog-cloud-target-resource`` is
set before signing so it sits in ``SignedHeaders`` (Google recommends it; Go
does it, google-auth does not), and ``Host`` is set explicitly because botocore
signs it without adding it to the headers (token-chain.md §D.2-D.5). botocore
does all of the signing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

import aiohttp
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from broker import httpclient, metrics
from broker.credconfig import AwsSource
from broker.diagnosis import AWS_REGION_FIX
from broker.errors import BrokerError, Step, Transient
from broker.sources.awscreds import (
    CredentialChain,
    FrozenCredentials,
    caller_arn,
    imds_region,
    principal_member,
    region_from_zone,
)

TIMEOUT = aiohttp.ClientTimeout(total=5, connect=2)


def signed_subject_token(creds: FrozenCredentials, region: str, url: str, audience: str) -> str:
    request = AWSRequest(
        method="POST",
        url=url,
        headers={"Host": urlsplit(url).netloc, "x-goog-cloud-target-resource": audience},
    )
    SigV4Auth(ReadOnlyCredentials(creds.access_key, creds.secret_key, creds.token), "sts", region).add_auth(
        request
    )
    token = {
        "url": url,
        "method": "POST",
        "headers": [{"key": key, "value": value} for key, value in request.headers.items()],
    }
    # Serialised as google-auth does; STS URL-decodes once and parses JSON.
    return quote(json.dumps(token, separators=(",", ":"), sort_keys=True))


class AwsTokenSource:
    kind = "aws"

    def __init__(
        self,
        source: AwsSource,
        audience: str,
        session: aiohttp.ClientSession,
        environ: Mapping[str, str],
        *,
        strict: bool = False,
    ) -> None:
        self._source = source
        self._audience = audience
        self._session = session
        self._strict = strict
        self._env_region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or ""
        self._environ = dict(environ)
        self._region: str | None = None
        self._chain = CredentialChain((source.url or "http://169.254.169.254/") if strict else None)
        self.last_method = ""

    async def subject_token(self) -> str:
        region = await self.region()
        creds = await self._credentials()
        url = self._source.regional_cred_verification_url.replace("{region}", region)
        return signed_subject_token(creds, region, url, self._audience)

    async def describe(self) -> dict[str, str]:
        region = await self.region()
        creds = await self._credentials()
        try:
            arn = await asyncio.to_thread(caller_arn, creds, region)
        except BrokerError as exc:
            return {"region": region, "provider": creds.method, "principal": f"unknown ({exc.reason})"}
        return {
            "region": region,
            "provider": creds.method,
            "principal": arn,
            "bind": principal_member(arn, self._audience),
        }

    async def _credentials(self) -> FrozenCredentials:
        # Timed and counted once, as the subject-token step (broker/steps.py), upstream="aws".
        creds = await asyncio.to_thread(self._chain.frozen)
        if creds.method != self.last_method:
            self.last_method = creds.method
            metrics.AWS_PROVIDER.clear()
            metrics.AWS_PROVIDER.labels(method=creds.method).set(1)
        return creds

    async def region(self) -> str:
        """AWS_REGION → AWS_DEFAULT_REGION → IMDS placement → the file's region_url; cached."""
        if self._region:
            return self._region
        region = self._env_region
        if not region and not self._strict:
            found: str | None = await asyncio.to_thread(imds_region, self._environ)
            region = found or ""
        if not region and self._source.region_url:
            region = await self._region_from_url()
        if not region:
            raise Transient(
                Step.AWS,
                "cannot determine the AWS region",
                fix=AWS_REGION_FIX,
            )
        self._region = region
        return region

    async def _region_from_url(self) -> str:
        headers: dict[str, str] = {}
        if self._source.imdsv2_session_token_url:
            reply = await httpclient.request(
                self._session,
                "PUT",
                self._source.imdsv2_session_token_url,
                Step.AWS,
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
                client_timeout=TIMEOUT,
            )
            if reply.status == 200:
                headers["X-aws-ec2-metadata-token"] = reply.body.decode()
        reply = await httpclient.request(
            self._session, "GET", self._source.region_url, Step.AWS, headers=headers, client_timeout=TIMEOUT
        )
        if reply.status != 200:
            return ""
        return region_from_zone(reply.body.decode().strip())

    async def close(self) -> None:
        return None  # nothing held between exchanges

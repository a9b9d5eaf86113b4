"""Subject-token sources: where the workload's native identity comes from.

One module per kind behind a two-member Protocol (golang/oauth2's
``baseCredentialSource``). ``build_source`` is the only place that maps
configuration to an implementation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

import aiohttp

from broker.credconfig import AwsSource, AzureSource, CredentialConfig, FileSource, UrlSource
from broker.errors import ConfigError


class SubjectTokenSource(Protocol):
    kind: str  # for logs and metrics labels only

    async def subject_token(self) -> str:
        """Fetch a fresh subject token; never cached across exchanges."""
        ...

    async def describe(self) -> dict[str, str]:
        """What this identity looks like to Google (claims, principal), never a token."""
        ...

    async def close(self) -> None:
        """Release what the source holds (SDK credentials); idempotent."""
        ...


def build_source(
    cred: CredentialConfig,
    session: aiohttp.ClientSession,
    *,
    environ: Mapping[str, str] | None = None,
    aws_strict: bool = False,
) -> SubjectTokenSource:
    # Cloud SDKs are imported only for the source in use: start-up time and RSS.
    from broker.sources.file import FileTokenSource
    from broker.sources.url import UrlTokenSource

    source = cred.source
    if isinstance(source, FileSource):
        return FileTokenSource(source)
    if isinstance(source, UrlSource):
        return UrlTokenSource(source, session)
    if isinstance(source, AwsSource):
        from broker.sources.aws import AwsTokenSource

        env = os.environ if environ is None else environ
        return AwsTokenSource(source, cred.audience, session, env, strict=aws_strict)
    if isinstance(source, AzureSource):
        from broker.sources.azure import AzureTokenSource

        env = os.environ if environ is None else environ
        return AzureTokenSource(source, session, env, cred.audience)
    raise ConfigError("credential_source", "unsupported")

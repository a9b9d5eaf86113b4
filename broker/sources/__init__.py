"""Subject-token sources: where the workload's native identity comes from.

One module per kind behind a two-member Protocol (golang/oauth2's
``baseCredentialSource``). ``build_source`` is the only place that maps
configuration to an implementation.
"""

from __future__ import annotations

from typing import Protocol

import aiohttp

from broker.credconfig import AwsSource, AzureSource, CredentialConfig, FileSource, UrlSource
from broker.errors import ConfigError


class SubjectTokenSource(Protocol):
    kind: str  # for logs and metrics labels only

    async def subject_token(self) -> str:
        """Fetch a fresh subject token; never cached across exchanges."""
        ...


def build_source(cred: CredentialConfig, session: aiohttp.ClientSession) -> SubjectTokenSource:
    from broker.sources.file import FileTokenSource
    from broker.sources.url import UrlTokenSource

    source = cred.source
    if isinstance(source, FileSource):
        return FileTokenSource(source)
    if isinstance(source, UrlSource):
        return UrlTokenSource(source, session)
    if isinstance(source, AwsSource):
        raise ConfigError("source", "the aws source is not available in this build yet")
    if isinstance(source, AzureSource):
        raise ConfigError("source", "the azure source is not available in this build yet")
    raise ConfigError("credential_source", "unsupported")

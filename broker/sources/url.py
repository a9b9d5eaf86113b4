"""A token served over HTTP, e.g. Azure IMDS or a local token service."""

from __future__ import annotations

import aiohttp

from broker import httpclient
from broker.credconfig import UrlSource
from broker.errors import Step
from broker.sources.extract import describe_jwt, extract

TIMEOUT = aiohttp.ClientTimeout(total=10, connect=3)


class UrlTokenSource:
    kind = "url"

    def __init__(self, source: UrlSource, session: aiohttp.ClientSession) -> None:
        self._source = source
        self._session = session
        # Azure IMDS answers 400 to "Metadata: True", which gcloud-generated
        # configs carry; it wants lower-case "true" (token-chain.md §E.2).
        self._headers = {
            name: value.lower() if name.lower() == "metadata" else value for name, value in source.headers
        }

    async def subject_token(self) -> str:
        reply = await httpclient.request(
            self._session,
            "GET",
            self._source.url,
            Step.SUBJECT_TOKEN,
            headers=self._headers,
            client_timeout=TIMEOUT,
        )
        if reply.status != 200:
            # Azure IMDS answers 404/410 while it is updating: retry, don't give up.
            transient = httpclient.TRANSIENT_STATUSES | {404, 410}
            raise httpclient.upstream_error(Step.SUBJECT_TOKEN, reply, transient=transient)
        return extract(reply.body, self._source.format, f"response of {self._source.url.split('?')[0]}")

    async def describe(self) -> dict[str, str]:
        return {"url": self._source.url.split("?")[0], **describe_jwt(await self.subject_token())}

    async def close(self) -> None:
        return None  # nothing held between exchanges

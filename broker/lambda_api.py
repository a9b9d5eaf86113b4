"""A client for the AWS Lambda Extensions API (``$AWS_LAMBDA_RUNTIME_API/2020-01-01/extension``).

Wire contract (docs.aws.amazon.com/lambda/latest/dg/runtimes-extensions-api.html):

* ``POST register`` with ``Lambda-Extension-Name`` (the executable's file name) and
  ``{"events": [...]}``; 200 carries ``Lambda-Extension-Identifier``.
* ``GET event/next`` with that identifier; 200 carries one event as JSON
  (``eventType`` ``INVOKE`` or ``SHUTDOWN``, ``deadlineMs`` in epoch milliseconds).
* ``POST init/error`` / ``POST exit/error`` with the identifier,
  ``Lambda-Extension-Function-Error-Type`` (``Category.Reason``) and an optional
  ``{"errorMessage", "errorType"}`` body; 202.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

API_VERSION = "2020-01-01"
MAX_BODY = 1 << 16
# Register and the error reports answer at once; a stuck Runtime API must not hang init.
CALL_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)
# event/next blocks until the next invoke, which may be hours away, and the sandbox is
# frozen meanwhile; AWS says not to time it out. Only the connection is bounded.
NEXT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5)


class ExtensionsApiError(Exception):
    """The Runtime API refused a call or could not be reached."""


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "INVOKE" | "SHUTDOWN"
    deadline_ms: int  # epoch milliseconds: the invoke's timeout, or the shutdown deadline
    request_id: str = ""
    shutdown_reason: str = ""  # SPINDOWN | TIMEOUT | FAILURE

    @staticmethod
    def parse(body: bytes) -> Event:
        try:
            data: Any = json.loads(body)
            kind = str(data["eventType"])
            deadline = int(data["deadlineMs"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ExtensionsApiError(f"event/next sent an unreadable event ({type(exc).__name__})") from None
        return Event(kind, deadline, str(data.get("requestId", "")), str(data.get("shutdownReason", "")))


class ExtensionsApi:
    """One extension's conversation with the Runtime API; owns its HTTP session."""

    def __init__(self, runtime_api: str) -> None:
        self._base = f"http://{runtime_api}/{API_VERSION}/extension"
        # trust_env=False: the function's HTTP(S)_PROXY is not for the sandbox-local API.
        self._session = aiohttp.ClientSession(trust_env=False)
        self.identifier = ""

    async def close(self) -> None:
        await self._session.close()

    async def register(self, name: str, events: tuple[str, ...]) -> str:
        status, headers, body = await self._call(
            "POST",
            "register",
            {"Lambda-Extension-Name": name},
            json.dumps({"events": list(events)}).encode(),
            CALL_TIMEOUT,
        )
        identifier = headers.get("Lambda-Extension-Identifier", "")
        if status != 200 or not identifier:
            raise ExtensionsApiError(f"register answered HTTP {status}: {_reason(body)}")
        self.identifier = identifier
        return identifier

    async def next_event(self) -> Event:
        status, _, body = await self._call(
            "GET", "event/next", {"Lambda-Extension-Identifier": self.identifier}, None, NEXT_TIMEOUT
        )
        if status != 200:
            raise ExtensionsApiError(f"event/next answered HTTP {status}: {_reason(body)}")
        return Event.parse(body)

    async def init_error(self, error_type: str, message: str) -> None:
        await self._report("init/error", error_type, message)

    async def exit_error(self, error_type: str, message: str) -> None:
        await self._report("exit/error", error_type, message)

    async def _report(self, path: str, error_type: str, message: str) -> None:
        # The message is the broker's own error text, which never carries a token.
        body = json.dumps({"errorMessage": message, "errorType": error_type}).encode()
        headers = {
            "Lambda-Extension-Identifier": self.identifier,
            "Lambda-Extension-Function-Error-Type": error_type,
        }
        status, _, reply = await self._call("POST", path, headers, body, CALL_TIMEOUT)
        if status != 202:
            raise ExtensionsApiError(f"{path} answered HTTP {status}: {_reason(reply)}")

    async def _call(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        client_timeout: aiohttp.ClientTimeout,
    ) -> tuple[int, dict[str, str], bytes]:
        if body is not None:
            headers = {**headers, "Content-Type": "application/json"}
        try:
            async with self._session.request(
                method, f"{self._base}/{path}", headers=headers, data=body, timeout=client_timeout
            ) as resp:
                data = bytearray()  # read(n) returns what has arrived: loop to EOF or the bound
                while len(data) < MAX_BODY and (chunk := await resp.content.read(MAX_BODY - len(data))):
                    data += chunk
                return resp.status, dict(resp.headers), bytes(data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ExtensionsApiError(f"{path}: cannot reach the Runtime API ({type(exc).__name__})") from None


def _reason(body: bytes) -> str:
    try:
        data = json.loads(body)
        return f"{data.get('errorType', '')}: {data.get('errorMessage', '')}"
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace") or "no body"

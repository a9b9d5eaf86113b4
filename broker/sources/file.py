"""A token file, e.g. a Kubernetes projected service-account token.

The file is re-read on every exchange: the kubelet rotates it at 80% of its
lifetime (reference/token-chain.md §F), so caching its content would replay an
expired token.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker.credconfig import FileSource
from broker.diagnosis import TOKEN_FILE_FIX
from broker.errors import Step, Transient
from broker.sources.extract import describe_jwt, extract

MAX_FILE = 1 << 20


class FileTokenSource:
    kind = "file"

    def __init__(self, source: FileSource) -> None:
        self._source = source

    async def subject_token(self) -> str:
        path = self._source.path
        try:
            raw = await asyncio.to_thread(_read, path)
        except FileNotFoundError:
            raise Transient(
                Step.SUBJECT_TOKEN,
                f"token file {path} does not exist",
                fix=TOKEN_FILE_FIX,
            ) from None
        except OSError as exc:
            raise Transient(Step.SUBJECT_TOKEN, f"cannot read token file {path}: {exc.strerror}") from None
        return extract(raw, self._source.format, f"token file {path}")

    async def describe(self) -> dict[str, str]:
        return {"path": self._source.path, **describe_jwt(await self.subject_token())}

    async def close(self) -> None:
        return None  # nothing held between exchanges


def _read(path: str) -> bytes:
    with Path(path).open("rb") as handle:
        return handle.read(MAX_FILE)

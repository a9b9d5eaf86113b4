"""Logging: JSON lines (or text), with every line redacted before it is written.

Redaction happens in the formatter of the one root handler, so it covers our
loggers and third-party ones alike (botocore at debug prints
``x-amz-security-token``; aiohttp client errors may echo URLs). Two nets:
patterns for anything token-shaped, and the exact values of tokens the broker
has handled recently.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections import deque
from datetime import UTC, datetime

REDACTED = "[REDACTED]"
_KEYS = r"access_?token|id_?token|subject_?token|token|secret_?access_?key|session_?token|client_assertion"
# Anchored to syntax, never to prose: a JSON or Python-repr key, a form/query
# "key=", a header line. "generateAccessToken: PERMISSION_DENIED" stays readable.
_PATTERNS = (
    re.compile(r"ya29\.[\w.\-]+"),
    re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"),  # JWTs: OIDC, ID tokens, Azure tokens
    re.compile(r"(?i)(\bbearer\s+)[\w.~+/-]+=*"),
    re.compile(r"(?i)([\"'](?:" + _KEYS + r")[\"']\s*:\s*[\"'])[^\"']+"),
    re.compile(r"(?i)((?<![\w-])(?:" + _KEYS + r")=)[^&\s\"']+"),
    re.compile(r"(?i)([\"']?(?:authorization|x-amz-security-token)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
    re.compile(r"(?i)(signature=)[0-9a-f]{16,}"),
)
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _Secrets:
    """The last few hundred secrets seen, matched verbatim (bounded memory)."""

    def __init__(self, size: int = 512) -> None:
        self._values: deque[str] = deque(maxlen=size)
        self._lock = threading.Lock()  # botocore logs from worker threads

    def add(self, value: str) -> None:
        if len(value) >= 8:
            with self._lock:
                self._values.append(value)

    def redact(self, text: str) -> str:
        with self._lock:
            values = list(self._values)
        for value in values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


SECRETS = _Secrets()


def remember_secret(value: str) -> None:
    SECRETS.add(value)


def redact(text: str) -> str:
    text = SECRETS.redact(text)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        )
        return redact(super().format(record) + (f" [{extras}]" if extras else ""))


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print every request line; our metrics count them.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

"""Logging: JSON lines (or text), with every line redacted before it is written.

The one place that decides what reaches the log (SPEC §8). Redaction happens in
the formatter of the one root handler, so it covers our loggers and third-party
ones alike: botocore at debug prints request headers with ``X-Amz-Security-Token``
as bytes (``b'...'``), the canonical request and ``Signature:\n<hex>``, and
response bodies carrying ``<SecretAccessKey>``; aiohttp client errors may echo
URLs. Two nets: patterns for anything token- or key-shaped, and the exact values
of secrets the broker has handled recently (tokens, and the session token and
signature inside each AWS subject token). Third-party loggers are held at INFO
unless ``log-level-third-party`` asks for more, whatever ``log-level`` says.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections import deque
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

REDACTED = "[REDACTED]"
_KEYS = (
    r"access_?token|id_?token|subject_?token|token|(?:aws_?)?secret_?access_?key|(?:aws_?)?session_?token"
    r"|client_assertion|assertion|secret"
)
# Anchored to syntax, never to prose: a JSON or Python-repr key, a form/query
# "key=", a header line. "generateAccessToken: PERMISSION_DENIED" stays readable.
_PATTERNS = (
    re.compile(r"ya29\.[\w.\-]+"),
    re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"),  # JWTs: OIDC, ID tokens, Azure tokens
    re.compile(r"(?i)(\bbearer\s+)[\w.~+/-]+=*"),
    re.compile(r"(?i)([\"'](?:" + _KEYS + r")[\"']\s*:\s*[\"'])[^\"']+"),
    re.compile(r"(?i)((?<![\w-])(?:" + _KEYS + r")=)[^&\s\"']+"),
    # Header values, in a dict repr as botocore prints them: a str or a bytes literal.
    re.compile(r"(?i)([\"']?(?:authorization|x-amz-security-token)[\"']?\s*[:=]\s*b?[\"']?)[^\s\"',}]+"),
    # SigV4: "Signature=<hex>" in the Authorization header, "Signature:\n<hex>" in botocore's
    # debug line (a real newline, or "\n" once JSON-escaped).
    re.compile(r"(?i)(\bsignature\s*[=:](?:\s|\\n)*)[0-9a-f]{16,}"),
    # XML response bodies (AWS STS AssumeRole*, GetSessionToken).
    re.compile(r"(?i)(<(?:SecretAccessKey|SessionToken|Token|AccessToken|IdToken|Assertion)>)[^<]+"),
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


def remember_subject_token(value: str) -> None:
    """Remember a subject token, and for an AWS one (a URL-encoded signed request) the
    session token and signature inside it, so each is redacted wherever it shows up
    verbatim: botocore logs them separately, never as the token the broker built."""
    SECRETS.add(value)
    if not value.startswith("%7B"):
        return
    try:
        request = json.loads(unquote(value))
        headers = {h["key"].lower(): str(h["value"]) for h in request["headers"]}
    except (ValueError, KeyError, TypeError, AttributeError):
        return
    if "x-amz-security-token" in headers:
        SECRETS.add(headers["x-amz-security-token"])
    signature = re.search(r"Signature=([0-9a-f]+)", headers.get("authorization", ""))
    if signature:
        SECRETS.add(signature.group(1))


def redact(text: str) -> str:
    text = SECRETS.redact(text)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Each value is redacted before JSON escaping (patterns see real newlines and
        # quotes, as botocore wrote them), and the line once more after.
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | None) else redact(str(value))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return redact(json.dumps(entry, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        )
        return redact(super().format(record) + (f" [{extras}]" if extras else ""))


class _Levels(logging.Filter):
    """``log-level`` for the broker's own loggers, ``log-level-third-party`` for every
    other one (botocore, urllib3, azure, msal, aiohttp, asyncio): at debug those print
    request headers and bodies, so they need asking for separately."""

    def __init__(self, own: int, third_party: int) -> None:
        super().__init__()
        self.own = own
        self.third_party = third_party

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "broker" or record.name.startswith("broker.")
        return record.levelno >= (self.own if ours else self.third_party)


def setup_logging(level: str, fmt: str, third_party: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    own, other = logging.getLevelName(level.upper()), logging.getLevelName(third_party.upper())
    handler.addFilter(_Levels(own, other))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # The root passes what either side wants; the handler's filter sorts them out.
    root.setLevel(min(own, other))
    # aiohttp's access log would print every request line; our metrics count them.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

"""Error classification shared by every step of the chain.

Errors are classified where they arise (transient vs. denied) and mapped to an
HTTP status in exactly one place (``metadata/wire.py``). Messages name the
step and the fix; they never carry a token.
"""

from __future__ import annotations

from enum import StrEnum


class Step(StrEnum):
    SUBJECT_TOKEN = "subject_token"
    STS = "sts"
    IAM_ACCESS = "iam_generate_access_token"
    IAM_ID = "iam_generate_id_token"
    AWS = "aws"
    AZURE = "azure"


class BrokerError(Exception):
    """A failure of one step of the token chain."""

    def __init__(
        self,
        step: Step,
        reason: str,
        *,
        fix: str = "",
        upstream_status: int | None = None,
        retry_after: float | None = None,
        code: str = "",
        details: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.step = step
        self.code = code  # the upstream's machine-readable error, e.g. invalid_grant
        # The upstream's structured facts (Google's ErrorInfo reason and metadata, e.g.
        # ("reason", "SERVICE_DISABLED"), ("consumer", "projects/123")): diagnosis reads
        # them instead of parsing English messages.
        self.details = details
        self.reason = reason
        self.fix = fix
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        super().__init__(self.describe())

    def with_fix(self, fix: str) -> BrokerError:
        """The same error, same class, with a more specific fix."""
        return type(self)(
            self.step,
            self.reason,
            fix=fix,
            upstream_status=self.upstream_status,
            retry_after=self.retry_after,
            code=self.code,
            details=self.details,
        )

    def detail(self, name: str) -> str:
        return next((value for key, value in self.details if key == name), "")

    def describe(self) -> str:
        status = f" (HTTP {self.upstream_status})" if self.upstream_status is not None else ""
        text = f"{self.step.value} failed{status}: {self.reason}"
        return f"{text}. Fix: {self.fix}" if self.fix else text


class Transient(BrokerError):
    """Worth retrying: timeouts, 5xx, 429, a token file that is mid-rotation."""


class Denied(BrokerError):
    """Permanent until an operator changes configuration or IAM policy."""


class NotFound(Denied):
    """What was asked for does not exist in this configuration (the metadata server answers 404)."""


class RateLimited(BrokerError):
    """Refused before any upstream call: the broker's own budget for cache misses is spent
    (SPEC §8 ``upstream-rate``). ``retry_after`` says when the next one will be allowed."""


class ConfigError(Exception):
    """Invalid configuration; the CLI prints it as one line and exits 2."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"{name}: {problem}")


class ReloadError(Exception):
    """SIGHUP could not re-read a file; the daemon keeps its running configuration."""

    def __init__(self, file: str, problem: str) -> None:
        self.file = file  # the settings (TOML) or credential file that failed
        self.problem = problem
        super().__init__(f"{file}: {problem}")

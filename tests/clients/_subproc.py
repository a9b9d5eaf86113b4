"""Run a real client as a subprocess without blocking the broker's event loop.

The broker under test serves from the test's own event loop, so a blocking
``subprocess.run`` would freeze it and the client would time out talking to it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningBroker

TIMEOUT_SECONDS = 60.0

# Host settings that would let a client find a project or credentials without the broker.
_HOST_OVERRIDES = ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "GOOGLE_CLOUD_QUOTA_PROJECT", "NO_GCE_CHECK")


def client_env(broker: RunningBroker, config_dir: Path) -> dict[str, str]:
    """The broker's client environment, minus host settings that would bypass it."""
    env = broker.client_env(config_dir)
    for key in _HOST_OVERRIDES:
        env.pop(key, None)
    return env


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        """Everything needed to debug a failed assertion about this run."""
        shown = " ".join("<script>" if "\n" in arg else arg for arg in self.argv)
        return (
            f"\n$ {shown}\n"
            f"exit status {self.returncode} after {self.seconds:.1f}s\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )

    def check(self) -> Completed:
        """Fail the test unless the client exited 0."""
        assert self.returncode == 0, f"client failed:{self.describe()}"
        return self

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError:
            pytest.fail(f"client stdout is not JSON:{self.describe()}")


async def _drain(stream: asyncio.StreamReader | None, sink: bytearray) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        sink += chunk


async def run(
    *argv: str, env: Mapping[str, str], limit_seconds: float = TIMEOUT_SECONDS, expect_ok: bool = True
) -> Completed:
    """Run ``argv`` to completion; on timeout kill its process group and fail with partial output."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, so a timeout kills gcloud's children too
    )
    out, err = bytearray(), bytearray()
    readers = asyncio.gather(_drain(proc.stdout, out), _drain(proc.stderr, err))
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), limit_seconds)
    except TimeoutError:
        timed_out = True
    finally:
        if proc.returncode is None:  # timed out, or the test was cancelled: leave nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # A grandchild that outlived the client may still hold the pipes open.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(readers, 10)
    result = Completed(
        tuple(argv),
        proc.returncode if proc.returncode is not None else -1,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        time.monotonic() - started,
    )
    if timed_out:
        pytest.fail(f"client did not finish within {limit_seconds:.0f}s:{result.describe()}")
    return result.check() if expect_ok else result


async def check_process(cred_file: Path, env: Mapping[str, str] | None = None) -> Completed:
    """``wif-broker check`` as a process (``python -m broker``): this test's environment,
    no ``WIF_BROKER_*`` from outside, plus ``env``. Its exit code is the result, not a failure."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WIF_BROKER_")}
    return await run(
        sys.executable,
        "-m",
        "broker",
        "check",
        "--credentials",
        str(cred_file),
        "--log-level",
        "error",
        env={**base, **(env or {})},
        expect_ok=False,
    )


def jwt_payload(token: str) -> dict[str, Any]:
    """The unverified claims of a compact JWS."""
    parts = token.split(".")
    assert len(parts) == 3, f"not a JWT: {token!r}"
    segment = parts[1] + "=" * (-len(parts[1]) % 4)
    claims = json.loads(base64.urlsafe_b64decode(segment))
    assert isinstance(claims, dict), f"JWT payload is not an object: {claims!r}"
    return claims

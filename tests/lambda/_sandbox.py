"""A Lambda sandbox on loopback: the fake Extensions API, FakeAws + FakeGoogle, the
extension as a real subprocess (so SIGSTOP/SIGCONT can freeze it), and "function"
processes using real google-auth with the metadata environment.

The function's execution-role credentials are keys issued by the fake AWS account
for a session named after the function, as Lambda puts them in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.fakes import DEFAULT_SERVICE_ACCOUNT, FakeGoogle
from tests.clients._subproc import Completed, run
from tests.fakes.aws import ISOLATED_ENV, FakeAws, accept_aws
from tests.fakes.lambda_runtime import FakeLambdaRuntime

FUNCTION_NAME = "wif-broker-test"
EXTENSION = str(Path(sys.executable).parent / "wif-broker")  # the console script: argv[0] "wif-broker"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"

FUNCTION_SCRIPT = """
import datetime, json
from google.auth import compute_engine
from google.auth.transport.requests import Request

creds = compute_engine.Credentials()
creds.refresh(Request())
left = (creds.expiry - datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)).total_seconds()
print(json.dumps({"token": creds.token, "seconds_left": left, "email": creds.service_account_email}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sandbox:
    runtime: FakeLambdaRuntime
    aws: FakeAws
    google: FakeGoogle
    env: dict[str, str]  # the environment Lambda gives the function and its extensions
    metadata_host: str

    @property
    def role_session_arn(self) -> str:
        return self.aws.account.assumed_role_arn(FUNCTION_NAME)

    def counts(self) -> tuple[int, int]:
        """(STS calls, IAM calls) so far."""
        return len(self.google.sts.calls), len(self.google.iam.calls)

    def function_env(self, config_dir: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in self.env.items() if not k.startswith("WIF_BROKER_")}
        env.update(
            GCE_METADATA_HOST=self.metadata_host,
            GCE_METADATA_IP=self.metadata_host,
            GCE_METADATA_ROOT=self.metadata_host,
            METADATA_EMULATOR_HOST=self.metadata_host,
            NO_PROXY="127.0.0.1,localhost",
        )
        if config_dir is not None:
            env["CLOUDSDK_CONFIG"] = str(config_dir)
        return env

    async def run_function(self) -> Completed:
        return await run(sys.executable, "-c", FUNCTION_SCRIPT, env=self.function_env(), limit_seconds=60)


@contextlib.asynccontextmanager
async def sandbox(
    *, lifetime_seconds: int = 3600, service_account: str = DEFAULT_SERVICE_ACCOUNT, **settings: str
) -> AsyncIterator[Sandbox]:
    """Fakes up and the environment ready; ``settings`` become WIF_BROKER_* variables."""
    async with FakeAws() as aws, FakeGoogle(lifetime_seconds=lifetime_seconds) as google:
        accept_aws(google.sts, aws.account)
        creds = aws.account.issue(session_name=FUNCTION_NAME)
        assert creds.session_token is not None
        runtime = FakeLambdaRuntime(probe=lambda: (len(google.sts.calls), len(google.iam.calls)))
        async with runtime:
            metadata = f"127.0.0.1:{free_port()}"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WIF_BROKER_"))}
            env.pop("PYTHONPATH", None)
            env.update(ISOLATED_ENV)
            env.update(
                AWS_LAMBDA_RUNTIME_API=runtime.address,
                AWS_ACCESS_KEY_ID=creds.access_key_id,
                AWS_SECRET_ACCESS_KEY=creds.secret_access_key,
                AWS_SESSION_TOKEN=creds.session_token,
                AWS_REGION="us-east-2",
                # Should anything ask AWS STS (nothing in `run` does): the fake, never AWS.
                AWS_ENDPOINT_URL_STS=aws.sts_url,
                AWS_EC2_METADATA_DISABLED="true",  # belt and braces: botocore never tries IMDS
                AWS_LAMBDA_FUNCTION_NAME=FUNCTION_NAME,
                WIF_BROKER_AUDIENCE=google.audience,
                WIF_BROKER_SERVICE_ACCOUNT=service_account,
                WIF_BROKER_TOKEN_URL=google.token_url,
                WIF_BROKER_IAM_ENDPOINT=google.iam_base_url,
                WIF_BROKER_LISTEN=metadata,
                WIF_BROKER_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
                WIF_BROKER_LOG_FORMAT="text",
            )
            for name, value in settings.items():
                env["WIF_BROKER_" + name.upper()] = value
            yield Sandbox(runtime, aws, google, env, metadata)


@contextlib.asynccontextmanager
async def extension(
    box: Sandbox, argv: Sequence[str] = (EXTENSION, "lambda-extension")
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The extension process as Lambda starts it; killed if the test leaves it running."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=box.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def exit_status(proc: asyncio.subprocess.Process, limit_seconds: float = 15.0) -> tuple[int, str]:
    """Wait for the process to exit; its status and everything it logged."""
    assert proc.stdout is not None
    output = await asyncio.wait_for(proc.stdout.read(), limit_seconds)
    status = await asyncio.wait_for(proc.wait(), limit_seconds)
    return status, output.decode(errors="replace")

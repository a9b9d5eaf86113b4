"""ECS task role via AWS_CONTAINER_CREDENTIALS_RELATIVE_URI, inside a network namespace.

botocore hard-wires the relative URI to ``http://169.254.170.2``, so the ECS
fake must own that address. ``test_ecs_netns.py`` creates a namespace with
169.254.170.2/32 on its loopback and runs this script there with
``ip netns exec``; the script refuses to run in the host's namespace. Inside,
it serves FakeEcsCredentials on 169.254.170.2:80 and FakeGoogle and AWS STS on
127.0.0.1, runs the production daemon with the ECS agent's environment, then
real gcloud and google-auth, and prints one JSON object with what it saw.

    WIFB_HOST_NETNS=$(readlink /proc/self/ns/net) \
        ip netns exec NS .venv/bin/python tests/aws/netns_ecs_scenario.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from broker.fakes import FakeGoogle  # noqa: E402
from tests.aws._harness import (  # noqa: E402
    broker_settings,
    clear_aws_env,
    credential_info,
    gcloud_path,
    provider_method,
    real_clients,
    signed_requests,
)
from tests.conftest import run_broker  # noqa: E402
from tests.fakes.aws import (  # noqa: E402
    ISOLATED_ENV,
    FakeAwsAccount,
    FakeAwsSts,
    FakeEcsCredentials,
    accept_aws,
)

ECS_ADDRESS = "169.254.170.2"


def in_host_namespace() -> bool:
    """True unless this process provably runs in another network namespace than the caller's.

    The caller names its own namespace in WIFB_HOST_NETNS (``readlink
    /proc/self/ns/net``); PID 1's is compared too when it is readable.
    """
    own = os.readlink("/proc/self/ns/net")
    outside = {os.environ.get("WIFB_HOST_NETNS", "")} - {""}
    with contextlib.suppress(OSError):
        outside.add(os.readlink("/proc/1/ns/net"))
    return not outside or own in outside


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{bound_host}:{bound_port}"


async def scenario(workdir: Path) -> dict[str, Any]:
    gcloud = gcloud_path()
    if gcloud is None:
        return {"error": "gcloud is not on PATH"}
    account = FakeAwsAccount()
    relative_uri = f"/v2/credentials/{uuid.uuid4()}"
    ecs = FakeEcsCredentials(account, path=relative_uri)
    aws_sts = FakeAwsSts(account)
    ecs_runner, ecs_url = await serve(ecs.app(), ECS_ADDRESS, 80)
    sts_runner, sts_url = await serve(aws_sts.app(), "127.0.0.1", 0)
    try:
        async with FakeGoogle() as google:
            accept_aws(google.sts, account)
            clear_aws_env()
            os.environ.update(
                {
                    **ISOLATED_ENV,
                    # What the ECS agent injects into every container of a task with a task role.
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": relative_uri,
                    "AWS_REGION": "us-east-2",
                    "AWS_DEFAULT_REGION": "us-east-2",
                    "AWS_ENDPOINT_URL_STS": sts_url,
                }
            )
            cred_file = workdir / "credentials.json"
            # The unmodified EC2-style file: its IMDS URLs are never needed on ECS.
            cred_file.write_text(json.dumps(credential_info(google, "http://169.254.169.254/")))
            async with run_broker(broker_settings(cred_file)) as broker:
                clients = await real_clients(broker, workdir, gcloud)
            return {
                "ecs_url": ecs_url + relative_uri,
                "method": provider_method(),
                "expected_subject": account.assumed_role_arn(),
                "subjects": sorted({t.subject for t in google.sts.issued.values()}),
                "signing_keys_known": all(account.lookup(s.access_key_id) for s in signed_requests(google)),
                "container_calls": [
                    {"method": c.method, "path": c.path, "accept": c.headers.get("accept", "")}
                    for c in ecs.calls
                ],
                "gcloud_ok": clients.gcloud.returncode == 0
                and clients.gcloud_token in google.iam.issued_access,
                "google_auth_ok": clients.google_auth.returncode == 0
                and clients.google_auth_token in google.iam.issued_access,
                "clients": clients.describe(),
                # SPEC §8: run never asks AWS STS who it is (check does).
                "caller_identity_calls": sum(
                    1 for c in aws_sts.calls if (c.form or {}).get("Action") == "GetCallerIdentity"
                ),
            }
    finally:
        await sts_runner.cleanup()
        await ecs_runner.cleanup()


def main() -> int:
    if in_host_namespace():
        print("refusing to run: not inside a separate network namespace (use ip netns exec)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="wifb-ecs-") as tmp:
        result = asyncio.run(scenario(Path(tmp)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

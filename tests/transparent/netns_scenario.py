"""Transparent mode end to end, inside a network namespace: real clients, no GCE variable at all.

``test_transparent.py`` creates the namespace (loopback up, 169.254.169.254/32
on ``lo``, ``/etc/netns/NS/hosts`` mapping metadata.google.internal to it, and
for the iptables variant the manifest's nat rule) and runs this script there
with ``ip netns exec``; the script refuses to run in the host's namespace. One
JSON argument describes the run; one JSON object on stdout reports it.

``alias``: the broker (in this process) listens on 169.254.169.254:80 itself;
the AWS fake IMDS it relays to is on 127.0.0.2:80, standing in for an IMDS
address the alias does not shadow.

``iptables``: the AWS fake IMDS owns 169.254.169.254:80, as the real IMDS does
for a pod; the broker runs as a separate process under the manifest's UID with
the manifest's settings on 127.0.0.1:8988, and the rule redirects every other
UID's connections to 169.254.169.254:80 there. The broker's own relay to
169.254.169.254 is exempt and reaches the fake IMDS.

Clients (concurrently, fresh config dirs): google-auth ``default()`` +
refresh + ``fetch_id_token`` (detects GCE by its 169.254.169.254 ping), gcloud
(metadata.google.internal), botocore's IMDSv2 credential fetch
(AWS_EC2_METADATA_SERVICE_ENDPOINT=http://169.254.169.254/), and when given,
Node's google-auth-library and Go's compute/metadata probes of tests/clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from broker import metrics, settings  # noqa: E402
from broker.fakes import FakeGoogle  # noqa: E402
from tests.clients._subproc import Completed, run  # noqa: E402
from tests.conftest import run_broker  # noqa: E402
from tests.fakes.aws import (  # noqa: E402
    ISOLATED_ENV,
    FakeAwsAccount,
    FakeImds,
)

IMDS = "169.254.169.254"
AUDIENCE = "https://svc.example.com"
CLIENT_SECONDS = 120.0
_NOT_INHERITED = ("GCE_METADATA", "AWS_", "CLOUDSDK_", "GOOGLE_", "WIF_BROKER_", "AZURE_", "WIFB_")
_NOT_INHERITED_EXACT = frozenset(
    {"NO_GCE_CHECK", "METADATA_SERVER_DETECTION", "METADATA_EMULATOR_HOST", "HTTP_PROXY", "HTTPS_PROXY"}
    | {"http_proxy", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"}
)

GOOGLE_AUTH = """
import json, sys
import google.auth
from google.auth import compute_engine
from google.auth.transport.requests import Request
from google.oauth2 import id_token

creds, project = google.auth.default()
creds.refresh(Request())
print(json.dumps({
    "compute_engine": type(creds) is compute_engine.Credentials,
    "project": project,
    "token": creds.token,
    "id_token": id_token.fetch_id_token(Request(), sys.argv[1]),
}))
"""

BOTOCORE = """
import json
import botocore.session

creds = botocore.session.get_session().get_credentials()
frozen = creds.get_frozen_credentials() if creds else None
print(json.dumps({
    "method": creds.method if creds else None,
    "access_key": frozen.access_key if frozen else None,
}))
"""


def in_host_namespace() -> bool:
    """True unless this process provably runs in another network namespace than the caller's."""
    own = os.readlink("/proc/self/ns/net")
    outside = {os.environ.get("WIFB_HOST_NETNS", "")} - {""}
    with contextlib.suppress(OSError):
        outside.add(os.readlink("/proc/1/ns/net"))
    return not outside or own in outside


def client_env(workdir: Path, name: str) -> dict[str, str]:
    """The host's environment minus anything that points at a metadata server, credentials or a proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
    env = {k: v for k, v in env.items() if k not in _NOT_INHERITED_EXACT}
    home = workdir / f"home-{name}"
    (home / "gcloud").mkdir(parents=True)
    env.update(
        HOME=str(home),  # no well-known ADC file anywhere
        CLOUDSDK_CONFIG=str(home / "gcloud"),  # fresh: gcloud caches "on GCE?" on disk
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
        CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
    )
    return env


async def client(name: str, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    try:
        done: Completed = await run(*argv, env=env, limit_seconds=CLIENT_SECONDS, expect_ok=False)
    except BaseException as exc:  # pytest.fail on a timeout raises a BaseException
        return {"ok": False, "out": None, "describe": f"{name}: {type(exc).__name__}: {exc}"}
    out: Any = None
    with contextlib.suppress(ValueError):
        out = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
    if out is None and done.returncode == 0:
        out = done.stdout.strip()
    return {"ok": done.returncode == 0, "out": out, "describe": done.describe()}


async def run_clients(config: dict[str, Any], workdir: Path) -> dict[str, dict[str, Any]]:
    jobs: dict[str, tuple[list[str], dict[str, str]]] = {
        "google_auth": ([sys.executable, "-c", GOOGLE_AUTH, AUDIENCE], client_env(workdir, "google-auth")),
        "botocore": (
            [sys.executable, "-c", BOTOCORE],
            {
                **client_env(workdir, "botocore"),
                **ISOLATED_ENV,
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{IMDS}/",
            },
        ),
    }
    if config.get("gcloud"):
        jobs["gcloud"] = ([config["gcloud"], "auth", "print-access-token"], client_env(workdir, "gcloud"))
    if config.get("node_dir"):
        probe = str(Path(config["node_dir"]) / "probe.js")
        jobs["node"] = ([config["node"], probe, AUDIENCE], client_env(workdir, "node"))
    if config.get("go_probe"):
        jobs["go"] = ([config["go_probe"], AUDIENCE], client_env(workdir, "go"))
    for _, env in jobs.values():
        assert not any(k.startswith(("GCE_METADATA", "METADATA_")) for k in env), "no GCE variable at all"
    results = await asyncio.gather(*(client(name, argv, env) for name, (argv, env) in jobs.items()))
    return dict(zip(jobs, results, strict=True))


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield
    finally:
        await runner.cleanup()


def readable_by_all(*paths: Path) -> None:
    """The iptables variant's broker runs under another UID and must read these."""
    for path in paths:
        path.chmod(0o755 if path.is_dir() else 0o644)


async def passthrough_count_in_process() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "wif_broker_requests_total", {"endpoint": "passthrough", "status": "2xx"}
    )
    return value or 0.0


async def passthrough_count_scraped(admin_url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith('wif_broker_requests_total{endpoint="passthrough",status="2xx"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def alias_variant(config: dict[str, Any], workdir: Path, cred_file: Path) -> dict[str, Any]:
    resolved = settings.build(
        {
            "credentials": str(cred_file),
            "listen": [f"{IMDS}:80"],
            "admin_listen": "127.0.0.1:0",
            "zone": "us-central1-a",
            "imds_passthrough": "http://127.0.0.2",
        },
        environ={},
    )
    async with run_broker(resolved):
        clients = await run_clients(config, workdir)
        relayed = await passthrough_count_in_process()
    return {"clients": clients, "passthrough_2xx": relayed, "broker_log": "", "broker_exit": 0}


async def _drain(stream: asyncio.StreamReader | None, sink: bytearray) -> None:
    while stream is not None and (chunk := await stream.read(65536)):
        sink += chunk


async def iptables_variant(config: dict[str, Any], workdir: Path, cred_file: Path) -> dict[str, Any]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(workdir),
        "PYTHONPATH": config["pythonpath"],
        "PYTHONDONTWRITEBYTECODE": "1",
        **ISOLATED_ENV,
        **config["broker_env"],
        "WIF_BROKER_CREDENTIALS": str(cred_file),
        "WIF_BROKER_ZONE": "us-central1-a",  # the example sets none; Node's probe reads instance/zone
        "WIF_BROKER_LOG_LEVEL": "debug",  # and still no token in the log
    }
    proc = await asyncio.create_subprocess_exec(
        config["broker_python"],
        "-m",
        "broker",
        "run",
        env=env,
        cwd="/",
        user=config["broker_uid"],
        group=config["broker_gid"],
        extra_groups=[],
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    log = bytearray()
    drain = asyncio.create_task(_drain(proc.stderr, log))
    try:
        if not await _ready(config["admin_url"], proc):
            return {"error": "the broker never became ready", "broker_log": log.decode(errors="replace")}
        clients = await run_clients(config, workdir)
        relayed = await passthrough_count_scraped(config["admin_url"])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drain, 10)
    text = log.decode(errors="replace")
    return {
        "clients": clients,
        "passthrough_2xx": relayed,
        "broker_log": text,
        "broker_exit": proc.returncode,
    }


async def _ready(admin_url: str, proc: asyncio.subprocess.Process) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for _ in range(600):  # up to ~60 s under load
            if proc.returncode is not None:
                return False
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(admin_url + "/readyz") as resp:
                    if resp.status == 200:
                        return True
            await asyncio.sleep(0.1)
    return False


async def scenario(config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    account = FakeAwsAccount()
    imds = FakeImds(account)
    imds_host = "127.0.0.2" if config["mode"] == "alias" else IMDS
    async with FakeGoogle() as google, serving(imds.app(), imds_host, 80):
        token_file = workdir / "token"
        token_file.write_text(google.subject_token())
        cred_file = workdir / "credentials.json"
        cred_file.write_text(json.dumps(google.credential_info(str(token_file))))
        readable_by_all(workdir, token_file, cred_file)
        variant = alias_variant if config["mode"] == "alias" else iptables_variant
        seen = await variant(config, workdir, cred_file)
    if "error" in seen:
        return seen
    issued = set(google.iam.issued_access) | set(google.iam.issued_id)
    log = seen.pop("broker_log")
    return {
        **seen,
        "issued_access": sorted(google.iam.issued_access),
        "issued_id": sorted(google.iam.issued_id),
        "aws_access_key": account.current().access_key_id,
        "aws_role": account.role_name,
        "imds_calls": [
            {
                "method": c.method,
                "path": c.path,
                "via": c.headers.get("via", ""),
                "xff": "x-forwarded-for" in c.headers,
                "token_ok": c.headers.get("x-aws-ec2-metadata-token") in imds.tokens,
            }
            for c in imds.calls
        ],
        "token_in_broker_log": any(t in log for t in issued | set(imds.tokens)),
        "broker_log_lines": len(log.splitlines()),
    }


def main() -> int:
    if in_host_namespace():
        print("refusing to run: not inside a separate network namespace (use ip netns exec)", file=sys.stderr)
        return 2
    config = json.loads(sys.argv[1])
    with tempfile.TemporaryDirectory(prefix="wifb-transparent-") as tmp:
        result = asyncio.run(scenario(config, Path(tmp)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

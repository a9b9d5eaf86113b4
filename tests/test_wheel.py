"""What ships (SPEC §12): the wheel holds the product, and every part of it is used.

The wheel is built from this checkout and installed alone into a fresh venv
(its dependencies resolved by pip, nothing from this checkout on ``sys.path``).
Every sub-command then runs from that venv against the fakes, with a
``sitecustomize`` that records the modules each process imported. Together the
runs must import every module the wheel ships, and every declared runtime
dependency must be imported by the product's own code (not only pulled in
by another dependency).

SLOW (~1 min): building the venv dominates; it is built once per session.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

import broker
from broker import cli
from broker.fakes import DEFAULT_SERVICE_ACCOUNT, FakeGoogle
from tests import pyast
from tests.fakes.aws import ISOLATED_ENV, FakeAws, accept_aws
from tests.fakes.azure import DEFAULT_APP, FakeAzure
from tests.fakes.tls import make_test_ca
from tests.webhook import _pods
from tests.webhook._fakeapi import FakeApiServer
from tests.webhook._process import WebhookProcess

# ``lambda`` is a keyword: its package is imported by name.
_sandbox = importlib.import_module("tests.lambda._sandbox")
ROOT = Path(__file__).resolve().parents[1]
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
# The demo's fakes; every other fake is test-only and lives in tests/fakes.
DEMO_FAKES = {"__init__", "_service", "google", "iam", "oidc", "sts"}
TRACER = """
import atexit, os, sys
_out = os.environ.get("WIF_TRACE_OUT")
if _out:
    def _dump():
        names = set(sys.modules)
        # python -m runs a module as __main__; its spec keeps the real name.
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None:
            names.add(spec.name)
        with open(_out, "a", encoding="utf-8") as f:
            f.write("\\n".join(sorted(names)) + "\\n")
    atexit.register(_dump)
"""


@dataclass
class Installed:
    wheel: Path
    venv: Path
    trace_dir: Path
    traces: Path
    ran: set[str] = field(default_factory=set)

    @property
    def program(self) -> Path:
        return self.venv / "bin" / "wif-broker"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "PYTHONHOME", "GOOGLE_APPLICATION_CREDENTIALS")
            and not k.startswith(("WIF_BROKER_", "AWS_", "AZURE_", "GCE_METADATA"))
        }
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
        env["PYTHONPATH"] = str(self.trace_dir)  # the tracer only: no checkout on sys.path
        env["WIF_TRACE_OUT"] = str(self.traces)
        env.update(extra or {})
        return env

    def imported(self) -> set[str]:
        return set(self.traces.read_text(encoding="utf-8").split()) if self.traces.exists() else set()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
        timeout=600,
        cwd=base,
    )
    (wheel,) = dist.glob("wif_broker-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        check=True,
        timeout=600,
        cwd=base,
        env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
    )
    trace_dir = base / "trace"
    trace_dir.mkdir()
    (trace_dir / "sitecustomize.py").write_text(TRACER, encoding="utf-8")
    return Installed(wheel, venv, trace_dir, base / "imported.txt")


def _wheel_modules(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".py")]
    return {n.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for n in names}


def test_wheel_holds_the_product_and_the_demo_fakes_only(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"broker"}, top
    fakes = {Path(n).stem for n in names if n.startswith("broker/fakes/") and n.endswith(".py")}
    assert fakes == DEMO_FAKES
    assert not [n for n in names if "test" in Path(n).stem], names


def test_the_installed_copy_is_not_this_checkout(installed: Installed) -> None:
    out = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", "import broker; print(broker.__file__)"],
        env=installed.env({"WIF_TRACE_OUT": ""}),
        cwd=installed.venv,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().startswith(str(installed.venv)), out.stdout


# -- running every command from the installed venv ---------------------------------------------


async def _run(
    installed: Installed, command: str, *args: str, env: dict[str, str] | None = None, module: bool = False
) -> str:
    """A command that exits by itself; returns stdout, asserts exit 0.

    ``module``: run it as ``python -m broker`` (SPEC §1: the same program).
    """
    installed.ran.add(command)
    program = [str(installed.venv / "bin" / "python"), "-m", "broker"] if module else [str(installed.program)]
    proc = await asyncio.create_subprocess_exec(
        *program,
        command,
        *args,
        env=installed.env(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=installed.venv,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, (command, out.decode()[-2000:], err.decode()[-2000:])
    return out.decode()


@contextlib.asynccontextmanager
async def _daemon(
    installed: Installed, command: str, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """A long-running command: yields the metadata address once it serves a token; SIGTERM → exit 0."""
    installed.ran.add(command)
    proc = await asyncio.create_subprocess_exec(
        str(installed.program),
        command,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        *args,
        env=installed.env(env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=installed.venv,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    metadata = ""
    try:
        async with asyncio.timeout(60):
            while not metadata:
                line = (await proc.stderr.readline()).decode()
                assert line, f"{command} exited before listening: {''.join(lines)[-3000:]}"
                lines.append(line)
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == "start":
                        metadata = str(record["metadata"]).split(",")[0]
        drain = asyncio.create_task(proc.stderr.read())
        yield metadata
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            rc = await proc.wait()
        rest = (await drain).decode()
        assert rc == 0, f"{command} exited {rc}: {rest[-3000:]}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _token(address: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.get(f"http://{address}{TOKEN_PATH}", headers={"Metadata-Flavor": "Google"}) as resp,
    ):
        body = await resp.text()
        assert resp.status == 200, body
        return dict(json.loads(body))


def _file_credentials(google: FakeGoogle, tmp_path: Path) -> Path:
    token = tmp_path / "token"
    token.write_text(google.subject_token())
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(google.credential_info(str(token))))
    return path


async def test_every_command_runs_from_the_wheel(installed: Installed, tmp_path: Path) -> None:
    assert (await _run(installed, "--version")).strip() == f"wif-broker {broker.__version__}"
    installed.ran.discard("--version")  # an option, not a command
    bundle = await _run(installed, "env", "--format", "sh")
    assert "GCE_METADATA_HOST=127.0.0.1:8988" in bundle

    async with _daemon(installed, "demo") as address:
        assert str((await _token(address))["access_token"]).startswith("ya29.fake-")

    async with FakeGoogle() as google:
        creds = _file_credentials(google, tmp_path)
        async with _daemon(installed, "run", "--credentials", str(creds)) as address:
            assert (await _token(address))["access_token"] in google.iam.issued_access
        out = await _run(installed, "check", "--credentials", str(creds), module=True)
        assert "FAIL" not in out
        assert not [t for t in google.iam.issued_access if t in out]

        async with FakeAws() as aws:
            accept_aws(google.sts, aws.account)
            aws_env = {**ISOLATED_ENV, **aws.imds_env(), "AWS_REGION": "us-east-2"}
            fileless = [
                "--audience",
                google.audience,
                "--service-account",
                DEFAULT_SERVICE_ACCOUNT,
                "--token-url",
                google.token_url,
                "--iam-endpoint",
                google.iam_base_url,
            ]
            async with _daemon(installed, "run", *fileless, "--source", "aws", env=aws_env) as address:
                assert (await _token(address))["access_token"] in google.iam.issued_access

        async with FakeAzure() as azure:
            azure.google_provider(google.sts)
            azure_env = azure.managed_identity_env()
            async with _daemon(
                installed,
                "run",
                *fileless,
                "--source",
                "azure",
                "--azure-resource",
                DEFAULT_APP.app_id_uri,
                env=azure_env,
            ) as address:
                assert (await _token(address))["access_token"] in google.iam.issued_access

    await asyncio.to_thread(_webhook_admits_a_pod, installed, tmp_path / "webhook")
    await _lambda_extension_serves_an_invoke(installed)

    # Every sub-command the CLI offers was run above.
    help_text = await _run(installed, "--help")
    installed.ran.discard("--help")
    offered = {c for c in cli.COMMANDS if c in help_text}
    assert offered <= installed.ran, offered - installed.ran

    imported = installed.imported()
    unused = sorted(_wheel_modules(installed.wheel) - imported)
    assert not unused, f"shipped but imported by no command: {unused}"

    provided = _dependency_modules(installed)
    direct = _product_imports(installed.wheel)
    for dist, modules in provided.items():
        assert modules & imported, f"{dist} is declared but no command imported it"
        assert any(_covers(modules, name) for name in direct), f"{dist} is imported by no product module"


def _webhook_admits_a_pod(installed: Installed, tmp: Path) -> None:
    """``webhook`` from the wheel, against the strict fake API server: one pod injected."""
    installed.ran.add("webhook")
    tmp.mkdir()
    make_test_ca(tmp)
    api = FakeApiServer(tmp).start()
    try:
        api.add("team-a", "app", {"iam.gke.io/gcp-service-account": _pods.SA_EMAIL})
        process = WebhookProcess.annotated_default(
            tmp,
            api.write_kubeconfig(tmp / "kubeconfig"),
            tmp,
            program=[str(installed.program)],
            environ=installed.env(),
        )
        try:
            process.wait_ready()
            answer = process.review(_pods.deployment_pod())
        finally:
            rc = process.stop()
        assert answer.allowed, answer.message
        assert answer.patch, "a pod of an annotated ServiceAccount is injected"
        assert rc == 0, process.log()
    finally:
        api.stop()


async def _lambda_extension_serves_an_invoke(installed: Installed) -> None:
    """``lambda-extension`` from the wheel in a loopback Lambda sandbox: init, one invoke, shutdown."""
    installed.ran.add("lambda-extension")
    async with _sandbox.sandbox() as box:
        box.env.update(
            {k: v for k, v in installed.env().items() if k in ("PATH", "PYTHONPATH", "WIF_TRACE_OUT")}
        )
        async with _sandbox.extension(box, argv=(str(installed.program), "lambda-extension")) as proc:
            await box.runtime.wait_for_poll(1)
            box.runtime.deliver_invoke()
            assert (await _token(box.metadata_host))["access_token"] in box.google.iam.issued_access
            await box.runtime.wait_for_poll(2)
            box.runtime.deliver_shutdown(deadline_seconds=2.0)
            status, output = await _sandbox.exit_status(proc)
        assert status == 0, output
        assert box.runtime.errors == []


def _covers(modules: set[str], name: str) -> bool:
    return name in modules or any(name.startswith(m + ".") for m in modules)


def _dependency_modules(installed: Installed) -> dict[str, set[str]]:
    """Each declared runtime dependency -> the modules its distribution installs."""
    script = """
import json, re
from importlib import metadata
out = {}
for req in metadata.requires("wif-broker") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[ ;<>=!~\\[]", req, maxsplit=1)[0]
    mods = set()
    for f in metadata.distribution(name).files or []:
        p = str(f)
        if p.endswith(".py") and ".dist-info" not in p and not p.startswith(".."):
            mods.add(p[:-3].removesuffix("/__init__").replace("/", "."))
    out[name] = sorted(mods)
print(json.dumps(out))
"""
    result = subprocess.run(
        [str(installed.venv / "bin" / "python"), "-c", script],
        env=installed.env({"WIF_TRACE_OUT": ""}),
        capture_output=True,
        text=True,
        check=True,
    )
    found = {k: set(v) for k, v in json.loads(result.stdout).items()}
    assert found, "no runtime dependency declared?"
    assert all(found.values()), found
    return found


def _product_imports(wheel: Path) -> set[str]:
    """Module names the shipped code imports directly (absolute imports)."""
    names: set[str] = set()
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if not member.endswith(".py"):
                continue
            tree = pyast.parse(zf.read(member))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
                    names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names

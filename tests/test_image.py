"""The image, built and run for real with podman (SPEC §12).

One build per session (cached layers make rebuilds take seconds; the cold build
~1 min), from the Dockerfile as shipped except for the base: ``PYTHON_IMAGE`` is
the debootstrapped ``localhost/pybase:bookworm`` because no registry is reachable.
Then ``wif-broker demo`` runs in it with ``--network none --read-only``, and:

- it runs as 65532, cannot write its root filesystem, and logs no token;
- ``podman healthcheck run`` passes (and fails for a container that serves nothing);
- a client container sharing its network namespace, as an app container shares a
  pod with the sidecar, gets a token; one in its own namespace does not;
- the runtime image holds no pip, setuptools, wheel or compiler;
- SIGTERM (``podman stop``) ends it with exit code 0, well before the SIGKILL.

Select with ``-m image``. In CI (CI=true) missing podman or base image is a failure
(scripts/install-podman provides both); elsewhere the module is skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

import broker
from tests import podman
from tests.conftest import IN_CI

pytestmark = pytest.mark.image

VENV_PYTHON = "/opt/wif-broker/bin/python"
TOKEN_URL = "http://127.0.0.1:8988/computeMetadata/v1/instance/service-accounts/default/token"
READY_URL = "http://127.0.0.1:8989/readyz"
# HEALTHCHECK timers need systemd, absent here; `podman healthcheck run` works without them.
NO_TIMER = ("--health-interval", "disable")
# As a restricted Kubernetes pod runs it: read-only root with only /tmp writable (an
# emptyDir; podman would otherwise also mount /run and /var/tmp), no capabilities.
SANDBOX = (
    "--network", "none", "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
    "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *NO_TIMER,
)  # fmt: skip

# Runs in a client container next to the broker: the image has python but no curl.
CLIENT = """
import json, sys, urllib.request as u
opener = u.build_opener(u.ProxyHandler({}))
request = u.Request(sys.argv[1], headers={"Metadata-Flavor": "Google"})
try:
    with opener.open(request, timeout=5) as response:
        print(json.dumps({"status": response.status, "body": json.loads(response.read())}))
except OSError as error:
    print(json.dumps({"error": repr(error)}))
"""

# Runs inside the runtime image: what an attacker (or a stray `pip install`) would find.
INSTALLERS = """
import importlib.util, json, os, shutil, sys
found = {name: bool(importlib.util.find_spec(name))
         for name in ("pip", "setuptools", "wheel", "pkg_resources", "_distutils_hack", "ensurepip")}
found["programs"] = sorted(p for p in ("pip", "pip3", "easy_install", "wheel", "cc", "gcc", "c++", "g++",
                                       "clang", "make", "ld", "as", "curl", "wget")
                           if shutil.which(p))
found["wheels"] = sorted(os.path.join(d, f) for d, _, files in os.walk("/usr") for f in files
                         if f.endswith(".whl"))
found["broker"] = bool(importlib.util.find_spec("broker")) and bool(importlib.util.find_spec("aiohttp"))
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    why = podman.missing()
    if why:
        if IN_CI:
            pytest.fail(f"the image test needs podman in CI: {why}")
        pytest.skip(why)
    with podman.removed_image(f"localhost/{podman.unique('wif-broker-test')}:test") as tag:
        podman.build(tag, build_args=[f"REVISION={podman.git_revision()}"])
        yield tag


def _wait_ready(name: str, deadline_s: float = 60) -> None:
    """Poll /readyz from inside the container (first token minted) within a bounded time."""
    check = f"import urllib.request as u; u.build_opener(u.ProxyHandler({{}})).open({READY_URL!r}, timeout=2)"
    deadline = time.monotonic() + deadline_s
    while True:
        result = podman.podman("exec", name, VENV_PYTHON, "-c", check, check=False)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            logs = podman.podman("logs", name, check=False)
            raise AssertionError(f"{name} not ready after {deadline_s}s:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def demo(image: str) -> Iterator[str]:
    with podman.container(image, "demo", options=SANDBOX) as name:
        _wait_ready(name)
        yield name


def _client(image: str, network: str, url: str) -> dict[str, object]:
    result = podman.podman(
        "run", "--rm", *podman.ULIMITS, "--network", network, "--read-only",
        "--entrypoint", VENV_PYTHON, image, "-c", CLIENT, url,
    )  # fmt: skip
    answer = json.loads(result.stdout)
    assert isinstance(answer, dict)
    return answer


def test_image_metadata(image: str) -> None:
    info = podman.inspect(image)
    config = info["Config"]
    assert config["User"] == "65532:65532"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == broker.__version__
    assert labels["org.opencontainers.image.revision"] == podman.git_revision() != "unknown"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["Entrypoint"] == ["wif-broker"]
    health = info["Healthcheck"]["Test"]  # kept only by --format docker
    assert health[0] == "CMD", "exec form (CMD-SHELL would need a shell)"


def test_demo_runs_non_root_on_a_read_only_root(image: str, demo: str) -> None:
    state = podman.inspect(demo, "container")
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    probe = (
        "import json, os\n"
        "try:\n    open('/opt/wif-broker/probe', 'w')\n    wrote = True\n"
        "except OSError as e:\n    wrote = e.errno\n"
        "print(json.dumps([os.getuid(), os.getgid(), wrote]))"
    )
    uid, gid, wrote = json.loads(podman.podman("exec", demo, VENV_PYTHON, "-c", probe).stdout)
    assert (uid, gid) == (65532, 65532)
    assert wrote == 30, "EROFS: the root filesystem is read-only"
    # The daemon itself (PID 1), not only what exec starts, runs as 65532.
    top = podman.podman("top", demo, "huser", "args").stdout.splitlines()
    assert any("wif-broker" in line and line.split()[0] == "65532" for line in top[1:]), top


def test_healthcheck_passes_and_fails_when_nothing_serves(image: str, demo: str) -> None:
    assert podman.podman("healthcheck", "run", demo, check=False).returncode == 0
    # Control: the same HEALTHCHECK in a container whose broker never started.
    idle = ("--entrypoint", VENV_PYTHON, *SANDBOX)
    with podman.container(image, "-c", "import time; time.sleep(60)", options=idle) as name:
        assert podman.podman("healthcheck", "run", name, check=False).returncode != 0


def test_client_sharing_the_network_namespace_gets_a_token(image: str, demo: str) -> None:
    answer = _client(image, f"container:{demo}", TOKEN_URL)
    assert answer.get("status") == 200, answer
    body = answer["body"]
    assert isinstance(body, dict)
    assert body["token_type"] == "Bearer"
    assert body["access_token"].startswith("ya29.fake-")
    assert 0 < body["expires_in"] <= 3600
    # Control: a client in its own (empty) namespace cannot reach the loopback-bound broker.
    alone = _client(image, "none", TOKEN_URL)
    assert "error" in alone, alone
    # The token is served, never logged.
    logs = podman.podman("logs", demo)
    assert body["access_token"] not in logs.stdout + logs.stderr


def test_runtime_image_has_no_installers_or_compilers(image: str) -> None:
    # The base's own interpreter (debootstrap's /usr/bin) and the product's venv.
    for python in ("/usr/bin/python3", VENV_PYTHON):
        result = podman.podman(
            "run", "--rm", *podman.ULIMITS, *SANDBOX, "--entrypoint", python, image, "-c", INSTALLERS
        )
        found = json.loads(result.stdout)
        assert found.pop("broker") is (python == VENV_PYTHON), python
        assert found == {
            "pip": False,
            "setuptools": False,
            "wheel": False,
            "pkg_resources": False,
            "_distutils_hack": False,
            "ensurepip": found["ensurepip"],  # the stdlib module; without its wheels it installs nothing
            "programs": [],
            "wheels": [],
        }, python


def test_sigterm_stops_the_container_with_exit_0(image: str) -> None:
    with podman.container(image, "demo", options=SANDBOX) as name:
        _wait_ready(name)
        started = time.monotonic()
        # 20 s grace before SIGKILL: a kill would show as 137 and as a ~20 s stop.
        podman.podman("stop", "--time", "20", name)
        elapsed = time.monotonic() - started
        state = podman.inspect(name, "container")["State"]
        assert state["ExitCode"] == 0, state
        assert elapsed < 15, f"stop took {elapsed:.1f}s: SIGTERM was not honoured"

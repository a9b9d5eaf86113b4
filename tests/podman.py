"""Building and running the image with podman, the way this sandbox (and CI) allows.

Shared by tests/test_image.py and bench/image.py. The flags come from
shared/reference/tools-here.md: runc with cgroupfs (no systemd here), chroot
isolation for RUN steps, explicit ulimits (raising the defaults is refused),
``--format docker`` (OCI format drops HEALTHCHECK) and the host CA bundle mounted
into build steps (the registries are reached through a TLS proxy the host trusts).
No registry is reachable, so the base is ``localhost/pybase:bookworm``, built
from Debian packages by scripts/install-podman.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("PYBASE_IMAGE", "localhost/pybase:bookworm")
PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager=cgroupfs")
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000")
BUILD_TIMEOUT = 900  # a cold build downloads ~40 wheels; a warm one takes seconds
RUN_TIMEOUT = 120


class PodmanError(RuntimeError):
    pass


def missing() -> str | None:
    """Why the image cannot be built here (None when it can)."""
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/install-podman)"
    found = subprocess.run([*PODMAN, "image", "exists", BASE_IMAGE], capture_output=True, timeout=60)
    if found.returncode != 0:
        return f"base image {BASE_IMAGE} is missing (scripts/install-podman builds it)"
    return None


def podman(*args: str, timeout: float = RUN_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise PodmanError(f"podman {' '.join(args[:2])}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def git_revision() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def build(
    tag: str,
    *,
    context: Path = ROOT,
    dockerfile: Path | None = None,
    base: str | None = BASE_IMAGE,
    build_args: Sequence[str] = (),
) -> str:
    """Build ``context`` into ``tag``; returns the build log. Layers are cached between runs."""
    argv = [
        "build",
        "--format",
        "docker",
        "--isolation=chroot",
        *ULIMITS,
        "-v",
        "/etc/ssl/certs:/etc/ssl/certs:ro",
        *(["--build-arg", f"PYTHON_IMAGE={base}"] if base else []),
        *[arg for value in build_args for arg in ("--build-arg", value)],
        *(["-f", str(dockerfile)] if dockerfile else []),
        "-t",
        tag,
        str(context),
    ]
    return podman(*argv, timeout=BUILD_TIMEOUT).stdout


def inspect(ref: str, kind: str = "image") -> dict[str, Any]:
    (info,) = json.loads(podman(kind, "inspect", ref).stdout)
    assert isinstance(info, dict)
    return info


def image_size(ref: str) -> int:
    """Bytes of the image's uncompressed layers, as ``podman images`` reports."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


@contextlib.contextmanager
def removed_image(tag: str) -> Iterator[str]:
    """Yield ``tag``; remove the tag afterwards (its cached layers stay for the next run)."""
    try:
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)


@contextlib.contextmanager
def container(image: str, *args: str, name: str | None = None, options: Sequence[str] = ()) -> Iterator[str]:
    """A detached container, force-removed afterwards; yields its name."""
    name = name or unique("wif-broker-test")
    try:
        podman("run", "--detach", "--name", name, *ULIMITS, *options, image, *args)
        yield name
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)

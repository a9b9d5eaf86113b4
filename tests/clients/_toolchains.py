"""Client toolchains beyond a binary on PATH: npm packages, Debian Go sources, Python extras.

``scripts/install-clients`` installs all of them. As with ``require_tool``, a
missing one fails the test in CI (``CI=true``) and skips it elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import IN_CI, require_tool

HERE = Path(__file__).resolve().parent
NODE_DIR = HERE / "node"
GO_PROBE_DIR = HERE / "go" / "probe"
# Debian's layout for -dev packages of Go libraries (GOPATH mode, no network).
DEBIAN_GOPATH = Path("/usr/share/gocode")
GO_PACKAGES = ("cloud.google.com/go/compute/metadata", "golang.org/x/oauth2/google")
INSTALL_HINT = "run scripts/install-clients"


def require(present: bool, what: str) -> None:
    if present:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but missing ({INSTALL_HINT})")
    pytest.skip(f"{what} not installed ({INSTALL_HINT})")


def require_module(name: str) -> None:
    require(importlib.util.find_spec(name) is not None, f"Python package {name}")


def require_node_modules() -> Path:
    """``node`` on PATH and the pinned packages installed from package-lock.json."""
    require_tool("node")
    for package in ("gcp-metadata", "google-auth-library"):
        require((NODE_DIR / "node_modules" / package / "package.json").is_file(), f"npm package {package}")
    return NODE_DIR


def build_go_probe(out_dir: Path) -> Path:
    """Compile tests/clients/go/probe offline against Debian's packaged Go sources."""
    go = require_tool("go")
    for package in GO_PACKAGES:
        require((DEBIAN_GOPATH / "src" / package).is_dir(), f"Go package {package} (Debian -dev)")
    binary = out_dir / "probe"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(DEBIAN_GOPATH),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",  # pure Go: no C toolchain needed
    }
    if "HOME" not in env and "GOCACHE" not in env:
        env["GOCACHE"] = str(out_dir / "cache")  # else Go's default, reused across sessions
    done = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=GO_PROBE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"go build failed:\n{done.stdout}\n{done.stderr}"
    return binary

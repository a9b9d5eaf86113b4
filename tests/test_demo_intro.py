"""``wif-broker demo`` prints commands that work as printed, in a new shell (issue 15).

The demo runs as a real process (the venv's console script, and ``python -m broker``);
its printed ``export`` lines, google-auth one-liner and ``check`` command are then run
by ``bash`` with a bare environment: no active venv, a PATH with only the system
directories (where ``python3`` has no google-auth), so only absolute paths work.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.fakes import DEFAULT_SERVICE_ACCOUNT
from tests.test_lifecycle import free_port

START_DEADLINE = 20.0
CONSOLE_SCRIPT = Path(sys.executable).parent / "wif-broker"


def _commands(intro: str) -> list[str]:
    """The commands under "Then try:" and after: 2-space indented, ``\\`` continues a line."""
    commands: list[str] = []
    continuing = False
    for line in intro.split("Then try:", 1)[1].splitlines():
        if continuing:
            commands[-1] += "\n" + line
        elif line.startswith("  ") and not line.startswith("   "):
            commands.append(line.strip())
        continuing = line.endswith("\\")
    return commands


@pytest.fixture(params=["console-script", "python-m"])
def intro(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Start the demo, yield what it printed once it is listening; stop it afterwards."""
    python_m = [sys.executable, "-m", "broker"]
    launcher = [str(CONSOLE_SCRIPT)] if request.param == "console-script" else python_m
    if not CONSOLE_SCRIPT.is_file():
        pytest.fail(f"{CONSOLE_SCRIPT} missing: install the project into this venv (pip install -e .)")
    port, admin = free_port(), free_port()
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [*launcher, "demo", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
            stdout=sink,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + START_DEADLINE
        while "stops it." not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        yield out.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _new_shell(script: str, home: Path) -> subprocess.CompletedProcess[str]:
    """bash with what a fresh login has: system PATH, HOME, nothing of this venv or test."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_printed_commands_work_in_a_new_shell(intro: str, tmp_path: Path) -> None:
    exports = [line.split("#")[0].strip() for line in intro.splitlines() if line.startswith("export ")]
    assert any(e.startswith("export GCE_METADATA_HOST=") for e in exports)
    commands = _commands(intro)

    # The google-auth one-liner, with the venv's own interpreter named by absolute path.
    (one_liner,) = [c for c in commands if "google.auth.default()" in c]
    interpreter = shlex.split(one_liner)[0]
    assert Path(interpreter).is_absolute()
    assert Path(interpreter).resolve() == Path(sys.executable).resolve()
    result = _new_shell("\n".join([*exports, one_liner]), tmp_path)
    assert result.returncode == 0, result.stderr
    assert DEFAULT_SERVICE_ACCOUNT in result.stdout

    # The credential file is named, and `check` against it passes every step.
    match = re.search(r"credential file.*:\n\n  (\S+)\n", intro)
    assert match, intro
    cred_file = Path(shlex.split(match.group(1))[0])
    assert cred_file.is_absolute()
    assert cred_file.is_file()
    (check,) = [c for c in commands if " check --credentials " in c]
    argv = shlex.split(check)
    assert argv[-2:] == ["--credentials", str(cred_file)]
    assert Path(argv[0]).is_absolute()
    result = _new_shell(check, tmp_path)  # no exports: check needs only the file
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("\nok    ") >= 4, result.stdout
    assert "ya29." not in result.stdout, "check prints no token"

"""SPEC §8 "start-up errors": exit 2 and one stderr line naming the setting, never a traceback.

Each case runs ``python -m broker run`` as a real process: what an operator sees
is the exit code and stderr, and a traceback is only visible there.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SA = "app@wif-broker-demo.iam.gserviceaccount.com"
AUDIENCE = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/p/providers/q"


def credential(tmp_path: Path) -> dict[str, object]:
    token = tmp_path / "subject-token"
    token.write_text("eyJhbGciOiJub25lIn0.e30.")
    return {
        "type": "external_account",
        "audience": AUDIENCE,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        # Port 9 (discard) on loopback: nothing is contacted before the listeners bind.
        "token_url": "http://127.0.0.1:9/v1/token",
        "credential_source": {"file": str(token), "format": {"type": "text"}},
        "service_account_impersonation_url": (
            f"http://127.0.0.1:9/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"
        ),
    }


def good_credentials(tmp_path: Path) -> Path:
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps(credential(tmp_path)))
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIF_BROKER_")}
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    return subprocess.run(
        [sys.executable, "-m", "broker", "run", *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        env=env,
    )


def assert_one_line_exit_2(proc: subprocess.CompletedProcess[str], setting: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines[:5]
    assert len(lines[0]) < 400, lines[0][:400]
    assert f"configuration error: {setting}" in lines[0], lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


LISTEN = ("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")

TOML_CASES = {
    "bad-utf8": b'zone = "us-central1-a"\nproject-id = "\xff\xfe"\n',
    "deep-arrays": b"scopes = " + b"[" * 100_000,
    "deep-tables": b"scopes = " + b"{a = " * 100_000,
    "huge-int": b"refresh-before = " + b"9" * 5000 + b"\n",
    "huge-float": b"refresh-before = 1e999999\n",
    "long-int": b"refresh-before = " + b"9" * 4000 + b"\n",  # parses; would overflow a float later
    "non-string-list": b"scopes = [1, {a = 1}]\n",
    "non-string-listen": b'listen = ["127.0.0.1:0", 8988]\n',
}
TOML_SETTING = {
    "huge-float": "refresh-before",
    "long-int": "refresh-before",
    "non-string-list": "scopes",
    "non-string-listen": "listen",
}


@pytest.mark.parametrize("case", sorted(TOML_CASES))
def test_a_bad_settings_file(tmp_path: Path, case: str) -> None:
    config = tmp_path / "settings.toml"
    config.write_bytes(TOML_CASES[case])
    # A flag wins over the file (SPEC §2), so the listen case must not pass --listen.
    listen = LISTEN[2:] if case == "non-string-listen" else LISTEN
    proc = run("--config", str(config), "--credentials", str(good_credentials(tmp_path)), *listen)
    assert_one_line_exit_2(proc, TOML_SETTING.get(case, "config"))


JSON_CASES = {
    "bad-utf8": b'{"type": "external_account", "audience": "\xff"}',
    "deep-arrays": b"[" * 100_000,
    "deep-objects": b'{"a": ' * 100_000,
    "huge-int": b'{"token_lifetime_seconds": ' + b"9" * 5000 + b"}",
    "huge-float": b'{"token_lifetime_seconds": 1e999999}',
    "nan": b'{"token_lifetime_seconds": NaN}',
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_a_bad_credential_file(tmp_path: Path, case: str) -> None:
    cred = tmp_path / "credentials.json"
    cred.write_bytes(JSON_CASES[case])
    proc = run("--credentials", str(cred), *LISTEN)
    assert_one_line_exit_2(proc, "credentials")


@pytest.mark.parametrize("setting", ["listen", "admin-listen"])
def test_a_port_in_use(tmp_path: Path, setting: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        other = f"127.0.0.1:{free_port()}"
        listen, admin = (address, other) if setting == "listen" else (other, address)
        proc = run(
            "--credentials", str(good_credentials(tmp_path)), "--listen", listen, "--admin-listen", admin
        )
    assert_one_line_exit_2(proc, setting)
    assert address in proc.stderr


@pytest.mark.parametrize("setting", ["listen", "admin-listen"])
def test_an_address_this_host_does_not_have(tmp_path: Path, setting: str) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never configured on a host; nothing is sent.
    address, other = "192.0.2.1:8988", f"127.0.0.1:{free_port()}"
    listen, admin = (address, other) if setting == "listen" else (other, address)
    proc = run("--credentials", str(good_credentials(tmp_path)), "--listen", listen, "--admin-listen", admin)
    assert_one_line_exit_2(proc, setting)
    assert address in proc.stderr

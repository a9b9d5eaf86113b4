"""The layer ``scripts/build-lambda-layer`` builds works unpacked anywhere, on a plain python3.

The real script builds it (wheels for this interpreter and machine, from PyPI or
pip's cache: ~40 s), it is unpacked into a temporary directory (not /opt: the
layer finds its files from its own path), and ``extensions/wif-broker`` is started
as Lambda starts it, by a plain interpreter with PYTHONPATH unset, against the fake
Extensions API, AWS and Google. The entry point re-executes itself with ``-I -S``,
so nothing but the layer's own files can be imported.
"""

from __future__ import annotations

import asyncio
import stat
import sys
import zipfile
from pathlib import Path

from ._sandbox import exit_status, extension, sandbox

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-lambda-layer"
SYSTEM_PYTHON = Path("/usr/bin/python3")


def plain_python() -> str:
    """An interpreter outside the test venv, of the version the layer is built for."""
    if (
        SYSTEM_PYTHON.exists()
        and SYSTEM_PYTHON.resolve().name == f"python{sys.version_info[0]}.{sys.version_info[1]}"
    ):
        return str(SYSTEM_PYTHON)
    return str(getattr(sys, "_base_executable", sys.executable))


def unpack(layer: Path, into: Path) -> None:
    """Unzip keeping the Unix modes, as Lambda does."""
    with zipfile.ZipFile(layer) as archive:
        for info in archive.infolist():
            path = Path(archive.extract(info, into))
            mode = info.external_attr >> 16
            if mode:
                path.chmod(stat.S_IMODE(mode))


async def test_layer_runs_unpacked_with_a_plain_interpreter(tmp_path: Path) -> None:
    layer = tmp_path / "wif-broker-layer.zip"
    build = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        str(layer),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(build.communicate(), 600)
    assert build.returncode == 0, output.decode(errors="replace")
    unpacked = tmp_path / "unpacked"
    unpack(layer, unpacked)
    entry = unpacked / "extensions" / "wif-broker"
    assert entry.stat().st_mode & stat.S_IXUSR, "the extension is not executable"
    assert (unpacked / "wif-broker" / "lib" / "botocore").is_dir()
    assert not (unpacked / "python").exists(), "packages in python/ would land on the function's path"

    async with sandbox() as box, extension(box, (plain_python(), "-I", str(entry))) as proc:
        await box.runtime.wait_for_poll(1)
        cmdline = (await asyncio.to_thread(Path(f"/proc/{proc.pid}/cmdline").read_bytes)).split(b"\0")
        assert b"-S" in cmdline, f"not isolated from site-packages: {cmdline}"
        box.runtime.deliver_invoke()
        served = (await box.run_function()).json()
        await box.runtime.wait_for_poll(2)
        assert served["token"] in box.google.iam.issued_access
        assert box.counts() == (1, 1)
        box.runtime.deliver_shutdown()
        status, log = await exit_status(proc)
        assert status == 0, log
        assert str(ROOT / "broker") not in log
        assert box.runtime.violations == []

"""``python -m bench nginx``: the practical ceiling, nginx serving the same JSON from a file.

One nginx worker (``worker_processes 1``, ``daemon off``, config in a temp dir)
serves the token path from a static file holding a body of exactly the broker's
reply size, as ``application/json`` with ``Metadata-Flavor: Google``. In the same
run the broker (its own process, ``python -m broker run``, against the fakes in
this process) and the minimal aiohttp baseline (``bench.baseline_server``) are
started as ``python -m bench`` starts them. All three servers are pinned to core 0
and wrk to core 1 when ``taskset`` is available. After a warm-up of each, for
every connection count nginx, the baseline and the broker are measured back to
back with identical wrk runs (``bench.throughput.run_wrk``).

Writes ``docs/performance-nginx.md`` (``bench/report.py`` rewrites the whole of
``docs/performance.md``, so the section lives in its own file).

Exit status: 0 when measured, 1 when a measurement was invalid (wrk errors, a
server died), 2 when nginx or wrk is missing or the arguments are bad.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.baseline_server import body_of_size
from bench.common import (
    REPO,
    BenchError,
    Child,
    broker_cmd,
    can_pin,
    free_port,
    machine_info,
    pinned,
    started,
    wait_ok,
    write_credentials,
    wrk_missing,
)
from bench.throughput import LUA, SERVER_CORE, WRK_CORE, CpuMeter, WrkRun, _body_size, run_wrk
from bench.wire import FLAVOR, LOOPBACK, TOKEN_PATH
from broker.fakes import FakeGoogle

DEFAULT_OUTPUT = REPO / "docs" / "performance-nginx.md"
BEGIN = "<!-- nginx-ceiling:begin -->"
END = "<!-- nginx-ceiling:end -->"
SERVERS = ("nginx", "baseline", "broker")

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    types {{ }}
    default_type application/json;
    sendfile on;
    tcp_nopush off;
    tcp_nodelay on;
    etag off;
    server_tokens off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port} backlog=1024;
        location = {path} {{
            add_header Metadata-Flavor Google;
            alias {tmp}/token.json;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def _connections(text: str) -> list[int]:
    try:
        values = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or min(values) < 1 or max(values) > 10_000:
        raise argparse.ArgumentTypeError("connection counts must be between 1 and 10000")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench nginx",
        description="Cached-token throughput of the broker vs the aiohttp baseline vs nginx (static file).",
    )
    parser.add_argument("--seconds", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per server (default 3)")
    parser.add_argument(
        "--connections",
        type=_connections,
        default=[1, 32, 256],
        help="wrk connection counts (default 1,32,256)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers/wrk to cores 0/1")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"report path (default {DEFAULT_OUTPUT.relative_to(REPO)})",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 120:
        parser.error("--seconds must be between 1 and 120")
    if not 1 <= args.warmup <= 60:
        parser.error("--warmup must be between 1 and 60")
    return args


def say(text: str) -> None:
    print(text, flush=True)


def nginx_version(nginx: str) -> str:
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10, check=False)
    text = (out.stderr or out.stdout).strip()
    text = text.split(":", 1)[1].strip() if ":" in text else text
    return text.removeprefix("nginx/") or "unknown"


def write_nginx_conf(workdir: Path, port: int, body: bytes) -> Path:
    """Config and body in ``workdir/nginx``, readable by an unprivileged worker when nginx runs as root."""
    workdir.chmod(0o711)  # the worker must be able to traverse the (0700) temp dir
    tmp = workdir / "nginx"
    tmp.mkdir(mode=0o755, exist_ok=True)
    tmp.chmod(0o755)
    (tmp / "token.json").write_bytes(body)
    (tmp / "token.json").chmod(0o644)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, host=LOOPBACK, port=port, path=TOKEN_PATH))
    return conf


def _worker_pid(master: int) -> int:
    """The single nginx worker (the process doing the serving), else the master."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])
    return master


@dataclass
class Result:
    body_size: int
    pinned: bool
    runs: list[WrkRun]
    errors: list[str]

    def get(self, server: str, connections: int) -> WrkRun | None:
        return next((r for r in self.runs if r.server == server and r.connections == connections), None)


async def _check(session: aiohttp.ClientSession, url: str, size: int, name: str) -> None:
    async with session.get(url, headers=FLAVOR) as resp:
        if resp.headers.get("Metadata-Flavor") != "Google" and name == "nginx":
            raise BenchError(f"{name} did not send Metadata-Flavor: Google")
    if (got := await _body_size(session, url)) != size:
        raise BenchError(f"{name} body is {got} bytes, the broker's {size}")


async def measure(
    google: FakeGoogle,
    workdir: Path,
    nginx: str,
    connections: list[int],
    seconds: int,
    warmup: int,
    pin: bool,
) -> Result:
    server_core, wrk_core = (SERVER_CORE, WRK_CORE) if pin else (None, None)
    lua = workdir / "percentiles.lua"
    lua.write_text(LUA)
    cred = write_credentials(google, workdir)
    broker_port, admin_port, base_port, nginx_port = free_port(), free_port(), free_port(), free_port()
    urls = {
        "broker": f"http://{LOOPBACK}:{broker_port}{TOKEN_PATH}",
        "baseline": f"http://{LOOPBACK}:{base_port}{TOKEN_PATH}",
        "nginx": f"http://{LOOPBACK}:{nginx_port}{TOKEN_PATH}",
    }
    result = Result(body_size=0, pinned=pin, runs=[], errors=[])
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        broker = await stack.enter_async_context(
            started(
                "broker",
                pinned(broker_cmd(cred, broker_port, admin_port), server_core),
                workdir / "broker.log",
            )
        )
        await wait_ok(session, broker, f"http://{LOOPBACK}:{admin_port}/readyz")
        result.body_size = size = await _body_size(session, urls["broker"])
        baseline_cmd = [sys.executable, "-m", "bench.baseline_server", "--port", str(base_port)]
        baseline = await stack.enter_async_context(
            started(
                "baseline",
                pinned([*baseline_cmd, "--body-size", str(size)], server_core),
                workdir / "baseline.log",
            )
        )
        await wait_ok(session, baseline, urls["baseline"])
        conf = write_nginx_conf(workdir, nginx_port, body_of_size(size))
        ngx_dir = conf.parent
        ngx = await stack.enter_async_context(
            started(
                "nginx",
                pinned([nginx, "-p", str(ngx_dir), "-c", str(conf)], server_core),
                ngx_dir / "stdout.log",
            )
        )
        await wait_ok(session, ngx, urls["nginx"], headers=FLAVOR)
        for name in ("baseline", "nginx"):
            await _check(session, urls[name], size, name)
        children: dict[str, Child] = {"nginx": ngx, "baseline": baseline, "broker": broker}
        for name in SERVERS:
            say(f"  warm-up {name}: {warmup}s at 32 connections")
            await run_wrk(name, urls[name], 32, warmup, lua, wrk_core)
        for conns in connections:
            for name in SERVERS:
                child = children[name]
                pid = _worker_pid(child.pid) if name == "nginx" else child.pid
                meter = CpuMeter(pid, server_core, wrk_core)
                before = meter.read()
                run = await run_wrk(name, urls[name], conns, seconds, lua, wrk_core)
                meter.apply(run, before, meter.read())
                if not child.alive():
                    raise BenchError(f"{name} died during the run:\n{child.log_tail()}")
                result.runs.append(run)
                say(
                    f"  {name:8} c={conns:<4} {run.rps:>9,.0f} req/s  p50 {run.p50_ms:.3f}  "
                    f"p99 {run.p99_ms:.3f}  p99.9 {run.p999_ms:.3f} ms  "
                    f"cpu {run.cpu_us_per_req or 0:.1f} us/req  errors {run.error_total}"
                )
                if run.error_total:
                    result.errors.append(f"{name} at {conns} connections: wrk errors {run.errors}")
    return result


def _ratio(a: WrkRun | None, b: WrkRun | None) -> str:
    return f"{a.rps / b.rps:.2f}" if a and b and b.rps else "n/a"


def table(res: Result, connections: list[int]) -> list[str]:
    lines = [
        "| conns | server | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | broker/nginx | "
        "broker/baseline | baseline/nginx |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for conns in connections:
        ngx, base, brk = (res.get(s, conns) for s in SERVERS)
        ratios = f"{_ratio(brk, ngx)} | {_ratio(brk, base)} | {_ratio(base, ngx)}"
        for index, run in enumerate(r for r in (ngx, base, brk) if r is not None):
            cpu = f"{run.cpu_us_per_req:.1f}" if run.cpu_us_per_req is not None else "n/a"
            lines.append(
                f"| {conns if index == 0 else ''} | {run.server} | {run.rps:,.0f} | {run.p50_ms:.3f} | "
                f"{run.p99_ms:.3f} | {run.p999_ms:.3f} | {cpu} | " + (ratios if index == 0 else "| |") + " |"
            )
    return lines


def markdown(
    res: Result, connections: list[int], seconds: int, command: str, machine: dict[str, str], version: str
) -> str:
    pin = "nginx, baseline and broker pinned to core 0, wrk to core 1" if res.pinned else "unpinned"
    return "\n".join(
        [
            "# Performance: nginx ceiling",
            "",
            "Generated by `bench/nginx.py`; see [performance.md](performance.md) for the main report.",
            "",
            BEGIN,
            "## Cached-token serving vs nginx (static file) and a minimal aiohttp handler",
            "",
            f"Command: `{command}` — {machine['date']}",
            "",
            f"nginx {version} (one worker, `access_log off`, keep-alive, the token path served from a file "
            f"of {res.body_size} bytes as `application/json` with `Metadata-Flavor: Google`); "
            f"baseline `bench.baseline_server` (aiohttp {machine['aiohttp']}, same body size); "
            f"broker `python -m broker run --log-level warning` with the token cached. "
            f"Python {machine['python']}; {machine['wrk']}; "
            f"{machine['cpu']}, nproc {machine['nproc']}; {pin}. "
            "For each connection count the three servers run back to back: "
            f"`wrk -t1 -cN -d{seconds}s --latency -H 'Metadata-Flavor: Google' -s percentiles.lua URL` "
            "(one run each, after a warm-up). Ratios are req/s over req/s on the same connection count. "
            "CPU µs/req is the serving process's CPU time (nginx: the worker) per completed request.",
            "",
            *table(res, connections),
            "",
            END,
            "",
        ]
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx is None:
        print(
            "bench: nginx is not installed; the nginx-ceiling benchmark needs it "
            "(Debian: apt-get install -y nginx-light). Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    if wrk_missing():
        return 2
    pin = can_pin() and not args.no_pin
    machine = machine_info()
    version = nginx_version(nginx)
    began = time.perf_counter()
    say(
        f"nginx ceiling: nginx {version}, baseline, broker; "
        f"connections {','.join(map(str, args.connections))}, "
        f"{args.seconds}s each, {'pinned servers=core0 wrk=core1' if pin else 'unpinned'}"
    )

    async def run() -> Result:
        with tempfile.TemporaryDirectory(prefix="wif-bench-nginx-") as tmp:
            async with FakeGoogle() as google:
                return await measure(
                    google, Path(tmp), nginx, args.connections, args.seconds, args.warmup, pin
                )

    try:
        res = asyncio.run(run())
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"bench: measurement failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    command = " ".join(["python -m bench nginx", shlex.join(argv)]).strip()
    say("")
    for line in table(res, args.connections):
        say(line)
    say("")
    say(f"wall time: {time.perf_counter() - began:.0f} s")
    write_section(args.output, markdown(res, args.connections, args.seconds, command, machine, version))
    say(f"wrote {args.output}")
    for error in res.errors:
        print(f"bench: {error}", file=sys.stderr)
    return 1 if res.errors else 0


def write_section(path: Path, document: str) -> None:
    """Replace the marked section in ``path`` (keeping anything around it), or write the document."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old and old.index(BEGIN) < old.index(END):
        section = document[document.index(BEGIN) : document.index(END) + len(END)]
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(head + section + tail)
    else:
        path.write_text(document)

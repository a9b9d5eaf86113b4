"""``python -m bench``: run every benchmark, print the table, write docs/performance.md.

``python -m bench resilience [...]`` runs the long resilience benchmarks instead
(``bench/resilience.py``; writes docs/resilience.md).

``python -m bench image [...]`` builds the image before and after with podman and
reports image and venv sizes (``bench/image.py``; writes docs/image.md).

``python -m bench webhook [...]`` measures the Kubernetes admission webhook's latency at
50 concurrent reviews and its memory (``bench/webhook.py``; writes docs/webhook-performance.md).

``python -m bench abuse [...]`` floods one broker with distinct audiences, scope
sets and half-open connections (``bench/abuse.py``; SPEC §8).

``python -m bench nginx [...]`` measures the broker and the aiohttp baseline
against nginx serving the same JSON from a file (``bench/nginx.py``; writes
docs/performance-nginx.md).

``python -m bench lambda [...]`` measures the AWS Lambda extension: init time, the
function's first token cached vs. exchanged by itself, RSS (``bench/lambda_ext.py``;
writes docs/lambda.md).

Exit status: 0 when every measurement ran (a missed target is reported, not an
error, unless ``--strict``); 1 when a herd check failed or a measurement was
invalid (errors, a server died); 2 when wrk is missing or the arguments are bad.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import herd, report, startup, throughput
from bench.common import REPO, BenchError, can_pin, machine_info, wrk_missing
from broker.fakes import FakeGoogle

DEFAULT_OUTPUT = REPO / "docs" / "performance.md"


def _connections(text: str) -> list[int]:
    try:
        values = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or min(values) < 1 or max(values) > 10_000:
        raise argparse.ArgumentTypeError("connection counts must be between 1 and 10000")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="wif-broker benchmarks (loopback only, bounded)."
    )
    parser.add_argument("--quick", action="store_true", help="~30 s pass: 32 connections, 3 s runs")
    parser.add_argument("--connections", type=_connections, help="wrk connection counts (default 1,32,256)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, help="seconds of wrk warm-up per server (default 3; quick 1)")
    parser.add_argument(
        "--rounds", type=int, help="baseline/broker rounds at 32 connections (default 3; quick 1)"
    )
    parser.add_argument("--startup-runs", type=int, help="start-up repetitions (default 5; quick 3)")
    parser.add_argument("--herd-clients", type=int, default=1000, help="clients in the one-scope herd")
    parser.add_argument("--herd-sets", type=int, default=50, help="distinct scope sets in the second herd")
    parser.add_argument("--herd-per-set", type=int, default=20, help="clients per scope set")
    parser.add_argument("--herd-delay", type=float, default=0.05, help="fake STS/IAM answer delay (s)")
    parser.add_argument(
        "--quiet-budget",
        type=float,
        help="total seconds to wait for an idle machine before wrk runs (default 30; quick 10; 0 = never)",
    )
    parser.add_argument(
        "--reruns",
        type=int,
        help="noisy 32-connection pairs (>10%% other load) re-measured, in total (default 2; quick 1)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin server/wrk to cores 0/1")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"report path (default {DEFAULT_OUTPUT.relative_to(REPO)}; --quick writes none unless given)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also sample the broker with py-spy during an extra 32-connection run",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib PNGs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    quick = args.quick
    args.connections = args.connections or ([32] if quick else [1, 32, 256])
    args.duration = args.duration or (3 if quick else 10)
    args.warmup = args.warmup or (1 if quick else 3)
    args.startup_runs = args.startup_runs or (3 if quick else 5)
    args.rounds = args.rounds or (1 if quick else 3)
    if args.quiet_budget is None:
        args.quiet_budget = 10.0 if quick else 30.0
    if args.reruns is None:
        args.reruns = 1 if quick else 2
    if not 0 <= args.reruns <= 10:
        parser.error("--reruns must be between 0 and 10")
    if not 0 <= args.quiet_budget <= 120:
        parser.error("--quiet-budget must be between 0 and 120 seconds")
    if args.output is None and not quick:
        args.output = DEFAULT_OUTPUT
    if args.rounds > 10:
        parser.error("--rounds is at most 10")
    for name in ("duration", "warmup", "startup_runs", "herd_clients", "herd_sets", "herd_per_set"):
        value = getattr(args, name)
        if not 1 <= value <= 10_000 or (name == "duration" and value > 120):
            parser.error(f"--{name.replace('_', '-')} {value} is out of range")
    if not 0 <= args.herd_delay <= 5:
        parser.error("--herd-delay must be between 0 and 5 seconds")
    return args


def say(text: str) -> None:
    print(text, flush=True)


async def run(
    args: argparse.Namespace, pin: bool
) -> tuple[list[herd.HerdResult], startup.StartupResult, throughput.ThroughputResult]:
    say(
        f"[1/3] herd: {args.herd_clients} cold clients on one scope set, then "
        f"{args.herd_sets} sets x {args.herd_per_set} clients"
    )
    herds = await herd.measure(args.herd_clients, args.herd_sets, args.herd_per_set, args.herd_delay)
    for h in herds:
        say(
            f"  {h.name}: STS {h.sts_calls} (expected {h.expected_sts}), IAM {h.iam_calls} "
            f"(expected {h.expected_iam}), {h.ok_responses}/{h.clients} OK -> "
            + ("PASS" if h.passed else "FAIL")
        )
        for error in h.errors:
            say(f"    {error}")
    with tempfile.TemporaryDirectory(prefix="wif-bench-") as tmp:
        async with FakeGoogle() as google:
            say(f"[2/3] start-up: {args.startup_runs} runs of spawn -> /readyz 200, then import cost")
            st = await startup.measure(google, Path(tmp), args.startup_runs, say)
            say(
                f"  median {st.ready_median:.3f} s, RSS {report.mb(st.rss_median_mib * 1024):.1f} MB; "
                f"import {st.imports.importtime_ms:.0f} ms (importtime), {st.imports.wall_ms:.0f} ms (wall)"
            )
            say(
                f"[3/3] cached-token throughput: connections {','.join(map(str, args.connections))}, "
                f"{args.duration}s each, {'pinned server=core0 wrk=core1' if pin else 'unpinned'}"
            )
            tp = await throughput.measure(
                google,
                Path(tmp),
                args.connections,
                args.duration,
                args.warmup,
                pin,
                rounds=args.rounds,
                rounds_at=report.TARGET_CONNECTIONS,
                profile_seconds=args.duration if args.profile else None,
                quiet_budget=args.quiet_budget,
                reruns=args.reruns,
                progress=say,
            )
    return herds, st, tp


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["resilience"]:
        from bench import resilience

        return resilience.main(given[1:])
    if given[:1] == ["image"]:
        from bench import image

        return image.main(given[1:])
    if given[:1] == ["lambda"]:
        from bench import lambda_ext

        return lambda_ext.main(given[1:])
    if given[:1] == ["abuse"]:
        from bench import abuse

        return abuse.main(given[1:])
    if given[:1] == ["nginx"]:
        from bench import nginx

        return nginx.main(given[1:])
    if given[:1] == ["webhook"]:
        from bench import webhook

        return webhook.main(given[1:])
    args = parse_args(argv)
    if args.profile and shutil.which("py-spy") is None:
        print("bench: --profile needs py-spy on PATH (pip install py-spy)", file=sys.stderr)
        return 2
    if wrk_missing():
        return 2
    pin = can_pin() and not args.no_pin
    began = time.perf_counter()
    machine = machine_info()
    try:
        herds, st, tp = asyncio.run(run(args, pin))
    except (BenchError, OSError, TimeoutError) as exc:
        print(f"bench: measurement failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench", shlex.join(given)]).strip()
    results = report.Results(
        machine=machine,
        command=command,
        settings={
            "herd delay": f"{args.herd_delay * 1000:.0f} ms",
            "wrk": f"{args.duration}s per run",
            "warm-up": f"{args.warmup}s",
            "connections": ",".join(map(str, args.connections)),
            f"rounds at {report.TARGET_CONNECTIONS} conns": str(args.rounds),
            "start-up runs": str(args.startup_runs),
            "pinning": "server core 0, wrk core 1" if pin else "none",
            "quiet-wait budget": f"{args.quiet_budget:.0f}s",
            "noisy-pair re-runs": str(args.reruns),
        },
        herd=herds,
        throughput=tp,
        startup=st,
        wall_seconds=time.perf_counter() - began,
    )
    rows = report.summary_rows(results)
    say("")
    say(report.console_table(rows))
    say("")
    say(
        f"machine: {machine['cpu']}, nproc {machine['nproc']}, "
        f"Python {machine['python']}, aiohttp {machine['aiohttp']}"
    )
    say(f"wall time: {results.wall_seconds:.0f} s")
    if args.output is not None:
        for notice in report.write(results, args.output, with_plots=not args.no_plots):
            say(notice)
        say(f"wrote {args.output}")
    else:
        say("report not written (--quick without --output)")
    failed = any(not h.passed for h in herds) or bool(tp.errors)
    for error in tp.errors:
        print(f"bench: {error}", file=sys.stderr)
    missed = any(r.status == "MISS" for r in rows)
    if failed:
        return 1
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    raise SystemExit(main())

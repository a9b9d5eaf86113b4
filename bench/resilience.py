"""``python -m bench resilience``: the long runs (load, soak, rotation, short-lived, fleet).

Each part is its own module; this one parses the flags, runs the parts asked for,
prints a summary and (for a full run, or with ``--output``) writes
docs/resilience.md with its PNG plots. Loopback only; every loop is bounded.

Exit status: 0 when every part was measured (a missed target is reported, not
an error, unless ``--strict``); 1 when a measurement failed outright; 2 on bad
arguments or a missing tool (wrk for the load part).
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

from bench import resilience_report as report
from bench.common import REPO, BenchError, can_pin, machine_info

PARTS = ("load", "soak", "rotation", "shortlived", "fleet")
DEFAULT_OUTPUT = REPO / "docs" / "resilience.md"


def _parts(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"parts are a comma-separated subset of {','.join(PARTS)}")
    return chosen


def _delays(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seconds") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one delay")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench resilience",
        description="wif-broker long-running resilience benchmarks (loopback only, bounded).",
    )
    parser.add_argument("--only", type=_parts, help=f"run only these parts ({','.join(PARTS)})")
    parser.add_argument("--minutes", type=float, default=30.0, help="soak duration in minutes (default 30)")
    parser.add_argument("--load-connections", type=int, default=256, help="wrk connections (default 256)")
    parser.add_argument("--load-seconds", type=int, default=60, help="wrk duration (default 60)")
    parser.add_argument("--rotation-seconds", type=float, default=150.0, help="rotation run (default 150)")
    parser.add_argument("--rotation-clients", type=int, default=8, help="rotation clients (default 8)")
    parser.add_argument(
        "--shortlived-runs", type=int, default=15, help="invocations per client and mode (default 15)"
    )
    parser.add_argument(
        "--shortlived-delays",
        type=_delays,
        default=[0.05, 0.2],
        help="fake upstream delays in seconds, one run each (default 0.05,0.2)",
    )
    parser.add_argument("--fleet-brokers", type=int, default=10_000, help="simulated brokers (default 10000)")
    parser.add_argument("--fleet-hours", type=float, default=6.0, help="simulated hours (default 6)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the broker/wrk to cores 0/1")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib PNGs")
    parser.add_argument(
        "--output", type=Path, help=f"report path (default {DEFAULT_OUTPUT.relative_to(REPO)} for a full run)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--save-results", type=Path, help="also pickle the raw results here (to re-render with --report-from)"
    )
    parser.add_argument(
        "--report-from", type=Path, help="measure nothing: render the report from results saved earlier"
    )
    args = parser.parse_args(argv)
    args.parts = args.only or list(PARTS)
    if args.output is None and args.only is None:
        args.output = DEFAULT_OUTPUT
    checks = [
        ("--minutes", 0.5 <= args.minutes <= 24 * 60),
        ("--load-connections", 1 <= args.load_connections <= 10_000),
        ("--load-seconds", 1 <= args.load_seconds <= 3600),
        ("--rotation-seconds", 30 <= args.rotation_seconds <= 3600),
        ("--rotation-clients", 1 <= args.rotation_clients <= 1000),
        ("--shortlived-runs", 1 <= args.shortlived_runs <= 100),
        ("--shortlived-delays", all(0 <= d <= 5 for d in args.shortlived_delays)),
        ("--fleet-brokers", 1 <= args.fleet_brokers <= 100_000),
        ("--fleet-hours", 1.5 <= args.fleet_hours <= 48),
    ]
    for flag, ok in checks:
        if not ok:
            parser.error(f"{flag} is out of range")
    return args


def _measuring_args(argv: list[str]) -> list[str]:
    """The arguments that shape a measurement (not where its raw results were saved)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--save-results":
            skip = True
        elif not arg.startswith("--save-results="):
            out.append(arg)
    return out


def say(text: str) -> None:
    print(text, flush=True)


async def run(args: argparse.Namespace, pin: bool, results: report.Results) -> None:
    from bench import fleet, load, rotation, shortlived, soak

    with tempfile.TemporaryDirectory(prefix="wif-bench-res-") as tmp:
        workdir = Path(tmp)
        step = 0
        total = len(args.parts)
        if "load" in args.parts:
            step += 1
            say(f"[{step}/{total}] load: wrk {args.load_connections} connections for {args.load_seconds}s")
            results.load = await load.measure(workdir, args.load_connections, args.load_seconds, pin)
            r = results.load.run
            say(
                f"  {r.requests:,} requests, {r.rps:,.0f} req/s, p99 {r.p99_ms:.2f} ms, "
                f"errors {results.load.errors} -> {'PASS' if results.load.passed else 'FAIL'}"
            )
        if "soak" in args.parts:
            step += 1
            say(f"[{step}/{total}] soak: {args.minutes:g} min of 60 s tokens under load")
            results.soak = await soak.measure(workdir, args.minutes, pin, progress=say)
            s = results.soak
            say(
                f"  {s.requests:,} requests, {s.default_tokens_seen} default tokens, min expires_in "
                f"{s.min_expires_in}, violations {len(s.violations)} -> {'PASS' if s.passed else 'FAIL'}"
            )
        if "rotation" in args.parts:
            step += 1
            say(
                f"[{step}/{total}] rotation: {args.rotation_clients} clients for {args.rotation_seconds:g}s "
                "across 60 s tokens, upstream delay 50 ms"
            )
            results.rotation = await rotation.measure(
                workdir, args.rotation_clients, args.rotation_seconds, pin
            )
            rr = results.rotation
            w, o = rr.summary(True), rr.summary(False)
            say(
                f"  {len(rr.rotations)} rotations; p99 at rotation {w['p99']:.2f} ms vs elsewhere "
                f"{o['p99']:.2f} ms; "
                f">=50 ms: {w['slow']:.0f} at rotation, {o['slow']:.0f} elsewhere; min expires_in "
                f"{rr.min_expires_in} -> {'PASS' if rr.passed else 'FAIL'}"
            )
        if "shortlived" in args.parts:
            step += 1
            delays = ", ".join(f"{d * 1000:.0f} ms" for d in args.shortlived_delays)
            say(
                f"[{step}/{total}] short-lived processes: {args.shortlived_runs} runs per client and mode, "
                f"upstream delay {delays}"
            )
            results.shortlived = []
            for delay in args.shortlived_delays:
                results.shortlived.append(
                    await shortlived.measure(
                        workdir / f"d{delay:g}", args.shortlived_runs, delay, progress=say
                    )
                )
        if "fleet" in args.parts:
            step += 1
            say(
                f"[{step}/{total}] fleet: {args.fleet_brokers:,} simulated brokers over "
                f"{args.fleet_hours:g} h"
            )
            results.fleet = await fleet.measure(args.fleet_brokers, args.fleet_hours, progress=say)
            for f in results.fleet:
                sts, iam = f.sts, f.iam
                say(
                    f"  {f.name}: STS peak/mean after 1 h {sts[0]}/{sts[1]:.0f} = {sts[2]:.2f}, "
                    f"IAM {iam[0]}/{iam[1]:.0f} = {iam[2]:.2f} -> {'PASS' if f.passed else 'MISS'}"
                )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.report_from is not None:
        results = report.load(args.report_from)
        return finish(args, results)
    if "load" in args.parts and shutil.which("wrk") is None:
        print("bench resilience: the load part needs wrk (apt-get install -y wrk)", file=sys.stderr)
        return 2
    pin = can_pin() and not args.no_pin
    results = report.Results(
        machine=machine_info(),
        command=" ".join(["python -m bench resilience", shlex.join(_measuring_args(argv))]).strip(),
        minutes=args.minutes,
        pinned=pin,
    )
    began = time.perf_counter()
    try:
        asyncio.run(run(args, pin, results))
    except (BenchError, OSError, TimeoutError, RuntimeError) as exc:
        print(f"bench resilience: measurement failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench resilience: interrupted", file=sys.stderr)
        return 130
    results.wall_seconds = time.perf_counter() - began
    if args.save_results is not None:
        report.save(results, args.save_results)
        say(f"saved results to {args.save_results}")
    return finish(args, results)


def finish(args: argparse.Namespace, results: report.Results) -> int:
    rows = report.summary_rows(results)
    say("")
    say(report.console_table(rows))
    say(f"wall time: {results.wall_seconds:.0f} s")
    if args.output is not None:
        for notice in report.write(results, args.output, with_plots=not args.no_plots):
            say(notice)
        say(f"wrote {args.output}")
    failed = any(r.status == "FAIL" for r in rows)
    missed = any(r.status == "MISS" for r in rows)
    return 1 if failed or (missed and args.strict) else 0

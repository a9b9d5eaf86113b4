"""Turn the measurements into a console table, ``docs/performance.md`` and optional plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.common import write_report
from bench.herd import HerdResult
from bench.profile import RATE
from bench.startup import StartupResult
from bench.throughput import NOISY_PCT, ThroughputResult

TARGET_RATIO = 0.8
TARGET_P99_MS = 5.0
TARGET_CONNECTIONS = 32
# The measured-performance issue's targets: ready <= 1.0 s plus upstream time (the
# bench's fakes answer at once, so 1.0 s) and RSS <= 60 MB, idle and under load.
TARGET_READY_S = 1.0
TARGET_RSS_MB = 60.0  # decimal megabytes: 60e6 bytes


@dataclass
class Row:
    measurement: str
    result: str
    target: str
    status: str  # PASS | MISS | FAIL | n/a


@dataclass
class Results:
    machine: dict[str, str]
    command: str
    settings: dict[str, str]
    herd: list[HerdResult]
    throughput: ThroughputResult
    startup: StartupResult
    wall_seconds: float = 0.0
    plots: list[str] | None = None


def mb(kib: float) -> float:
    return kib * 1024 / 1e6


def _opt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def _check(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def summary_rows(res: Results) -> list[Row]:
    rows = []
    for herd in res.herd:
        rows.append(
            Row(
                f"Herd: {herd.name}",
                f"STS {herd.sts_calls}, IAM {herd.iam_calls}; {herd.ok_responses}/{herd.clients} OK, "
                f"{herd.distinct_tokens} token(s)",
                f"STS {herd.expected_sts}, IAM {herd.expected_iam}",
                "PASS" if herd.passed else "FAIL",
            )
        )
    tp = res.throughput
    for conns in tp.connection_counts():
        broker, base = tp.summary("broker", conns), tp.summary("baseline", conns)
        if broker is None or base is None:
            continue
        ratio = tp.ratio(conns)
        gated = conns == TARGET_CONNECTIONS
        rounds = f", median of {len(broker.runs)}" if len(broker.runs) > 1 else ""
        loads = [
            load
            for r in broker.runs + base.runs
            for load in (r.other_load_pct, r.wrk_other_load_pct)
            if load is not None
        ]
        noisy = f" (noisy: other load up to {max(loads):.0f}%)" if loads and max(loads) > NOISY_PCT else ""
        rows.append(
            Row(
                f"Cached token c={conns}: broker / baseline req/s{rounds}",
                f"{broker.med('rps'):,.0f} / {base.med('rps'):,.0f} -> ratio {ratio:.2f}{noisy}",
                f">= {TARGET_RATIO}" if gated else "-",
                _check(ratio >= TARGET_RATIO) if gated else "n/a",
            )
        )
        p99_note = ""
        if noisy and len(broker.runs) > 1:
            quiet = min(broker.runs, key=lambda r: r.noise)
            p99_note = f" (noisy; quietest round: p99 {quiet.p99_ms:.2f} ms at {quiet.noise:.0f}% other load)"
        rows.append(
            Row(
                f"Cached token c={conns}: broker p50 / p99 / p99.9",
                f"{broker.med('p50_ms'):.2f} / {broker.med('p99_ms'):.2f} / {broker.med('p999_ms'):.2f} ms"
                + p99_note,
                f"p99 <= {TARGET_P99_MS:g} ms" if gated else "-",
                _check(broker.med("p99_ms") <= TARGET_P99_MS) if gated else "n/a",
            )
        )
        if gated:
            b_cpu, base_cpu = broker.med("cpu_us_per_req"), base.med("cpu_us_per_req")
            rows.append(
                Row(
                    f"Cached token c={conns}: server CPU per request",
                    f"broker {b_cpu:.0f} us, baseline {base_cpu:.0f} us -> CPU-bound ratio "
                    f"{base_cpu / b_cpu:.2f}",
                    f"(>= {TARGET_RATIO})",
                    _check(base_cpu / b_cpu >= TARGET_RATIO),
                )
            )
    st = res.startup
    if st.runs:
        rows.append(
            Row(
                f"Start-up: spawn -> /readyz 200 (median of {len(st.runs)})",
                f"{st.ready_median:.3f} s",
                f"<= {TARGET_READY_S} s",
                _check(st.ready_median <= TARGET_READY_S),
            )
        )
        rss = mb(st.rss_median_mib * 1024)
        rows.append(
            Row(
                "Start-up: RSS once ready (median)",
                f"{rss:.1f} MB ({st.rss_median_mib:.1f} MiB)",
                f"<= {TARGET_RSS_MB:g} MB",
                _check(rss <= TARGET_RSS_MB),
            )
        )
        if res.throughput.broker_rss_kib_after:
            loaded = mb(res.throughput.broker_rss_kib_after)
            rows.append(
                Row(
                    "RSS after the throughput runs (under load)",
                    f"{loaded:.1f} MB",
                    f"<= {TARGET_RSS_MB:g} MB",
                    _check(loaded <= TARGET_RSS_MB),
                )
            )
        rows.append(
            Row(
                f"Import {IMPORT}: -X importtime / wall",
                f"{st.imports.importtime_ms:.0f} ms / {st.imports.wall_ms:.0f} ms",
                "-",
                "n/a",
            )
        )
    return rows


IMPORT = "broker.cli"


def console_table(rows: list[Row]) -> str:
    headers = Row("Measurement", "Result", "Target", "Status")
    table = [headers, *rows]
    widths = [max(len(getattr(r, f)) for r in table) for f in ("measurement", "result", "target", "status")]

    def fmt(r: Row) -> str:
        cells = (r.measurement, r.result, r.target, r.status)
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(headers), rule, *(fmt(r) for r in rows)])


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(res: Results) -> str:
    m = res.machine
    rows = summary_rows(res)
    tp, st = res.throughput, res.startup
    out: list[str] = []
    out.append("# Performance\n")
    out.append(
        "Generated by `python -m bench` (see `bench/README.md`) from one run on the machine below; "
        "every figure on this page is that run's output. Regenerate rather than edit: the numbers "
        "depend on the machine and on what else was running on it.\n"
    )
    out.append(f"```sh\n{res.command}\n```\n")
    out.append(
        "The practical ceiling, nginx serving the same JSON from a file, is measured by "
        "`python -m bench nginx` into [performance-nginx.md](performance-nginx.md).\n"
    )
    out.append(
        _md_table(
            ["", ""],
            [
                ["Date", m["date"]],
                ["CPU", f"{m['cpu']} — `nproc` = {m['nproc']}"],
                ["Memory", m["memory"] or "?"],
                ["OS", m["os"]],
                ["Python", m["python"]],
                ["aiohttp", m["aiohttp"]],
                ["wrk", m["wrk"]],
                ["Run settings", ", ".join(f"{k} {v}" for k, v in res.settings.items())],
                ["Bench wall time", f"{res.wall_seconds:.0f} s"],
            ],
        )
        + "\n"
    )
    out.append("## Summary\n")
    out.append(
        _md_table(
            ["Measurement", "Result", "Target", "Status"],
            [
                [r.measurement, r.result, r.target, f"**{r.status}**" if r.status != "n/a" else r.status]
                for r in rows
            ],
        )
        + "\n"
    )
    out.append(
        "PASS/MISS compare against the targets of the performance issue; FAIL on a herd row means "
        "the single-flight guarantee did not hold. A MISS is a finding, not a test failure. "
        "*CPU-bound ratio* is baseline CPU per request / broker CPU per request: the req/s ratio the "
        "two would reach if each had a core to itself and were CPU-bound, and the steadier of the two "
        f"ratios when other work shares the machine (a row is flagged noisy when a run saw more than "
        f"{NOISY_PCT:g}% other load on the server's or wrk's core).\n"
    )

    out.append("## 1. Herd / single-flight\n")
    out.append(
        "The production `daemon.serve` runs in the bench process against a fresh in-process "
        "`FakeGoogle` per scenario; both fakes answer with a "
        f"{res.settings.get('herd delay', '?')} delay. STS is held behind its gate from before the "
        "broker starts, so the start-up pre-warm is part of the herd. All clients are fired at once "
        "(one connection each, aiohttp `limit=0`), the gate opens only after the broker has looked "
        "up every request in its access-token cache (its own `wif_broker_cache_lookups_total`), and "
        "then the requests each fake received are counted. Scope set 0 of the second scenario is "
        "the default scope set (the pre-warm's own); the other 49 are two scopes each, sent in "
        "alternating order and separator (`,` or space) by the clients of the set.\n"
    )
    herd_rows = []
    for h in res.herd:
        lookups = ", ".join(f"{k} {v}" for k, v in h.lookups.items())
        herd_rows.append(
            [
                h.name,
                f"{h.sts_calls} (exp. {h.expected_sts})",
                f"{h.iam_calls} (exp. {h.expected_iam})",
                f"{h.ok_responses}/{h.clients}",
                str(h.distinct_tokens),
                f"{h.arrived_before_release}/{h.clients}",
                lookups,
                f"{h.seconds * 1000:.0f} ms",
                "PASS" if h.passed else "FAIL: " + "; ".join(h.errors or ["counts differ"]),
            ]
        )
    out.append(
        _md_table(
            [
                "Scenario",
                "STS calls",
                "IAM calls",
                "200 OK",
                "Distinct tokens",
                "Waiting at release",
                "Access-cache lookups",
                "Release → last reply",
                "Result",
            ],
            herd_rows,
        )
        + "\n"
    )
    out.append(
        "*Waiting at release*: requests the broker had already looked up (and parked on the "
        "in-flight load) when STS was let go. Lookups include the pre-warm's own miss.\n"
    )

    out.append("## 2. Cached-token throughput and latency\n")
    pin_text = (
        "server pinned to core 0 and wrk to core 1 with `taskset`"
        if tp.pinned
        else "no CPU pinning (taskset missing or fewer than 2 usable cores)"
    )
    out.append(
        "`GET /computeMetadata/v1/instance/service-accounts/default/token` with "
        "`Metadata-Flavor: Google`, served from the cache of a broker started as its own process "
        "(`python -m broker run --log-level warning`) against the fakes in the bench process. "
        f"Baseline: `bench/baseline_server.py`, a minimal aiohttp app (same aiohttp, "
        f"`access_log=None`, same backlog) returning a fixed {tp.body_size}-byte JSON body, the size of "
        f"the broker's reply, as `application/json`. {pin_text.capitalize()}. Each server got a "
        f"{res.settings.get('warm-up', '?')} wrk warm-up; then, per connection count, the baseline and "
        "the broker ran back to back, repeated for "
        f"{res.settings.get(f'rounds at {TARGET_CONNECTIONS} conns', '1')} round(s) at "
        f"{TARGET_CONNECTIONS} connections and once at other counts. Summary figures are medians "
        "over rounds; the ratio is the median of the per-round ratios:\n"
    )
    out.append(
        f"```sh\nwrk -t1 -c$C -d{round(tp.duration)}s --latency -H 'Metadata-Flavor: Google' "
        "-s percentiles.lua $URL\n```\n"
    )
    out.append(
        "Requests/sec and p50/p75/p90/p99 are wrk's own `--latency` output; p99.9 and max come from "
        "a Lua `done` hook (`latency:percentile(99.9)`), which also reports socket and non-2xx "
        "errors (all must be 0).\n"
    )
    tp_rows = []
    for conns in tp.connection_counts():
        runs = sorted(
            (r for r in tp.runs if r.connections == conns),
            key=lambda r: (r.round, not r.discarded, r.server != "baseline"),
        )
        for run in runs:
            tp_rows.append(
                [
                    str(conns),
                    f"{run.round} (noisy, re-run)" if run.discarded else str(run.round),
                    run.server,
                    f"{run.rps:,.0f}",
                    f"{run.p50_ms:.2f}",
                    f"{run.p90_ms:.2f}",
                    f"{run.p99_ms:.2f}",
                    f"{run.p999_ms:.2f}",
                    f"{run.max_ms:.2f}",
                    _opt(run.server_cpu_pct, "{:.0f}%"),
                    _opt(run.cpu_us_per_req, "{:.1f}"),
                    _opt(run.other_load_pct, "{:.0f}%") + " / " + _opt(run.wrk_other_load_pct, "{:.0f}%"),
                    str(run.error_total),
                ]
            )
        if tp.summary("broker", conns) and tp.summary("baseline", conns):
            label = "median ratio" if len({r.round for r in runs}) > 1 else "ratio"
            tp_rows.append([str(conns), "", f"**{label}**", f"**{tp.ratio(conns):.2f}**", *[""] * 9])
    out.append(
        _md_table(
            [
                "Conns",
                "Round",
                "Server",
                "req/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                "Server CPU",
                "CPU us/req",
                "Other load: server / wrk core",
                "Errors",
            ],
            tp_rows,
        )
        + "\n"
    )
    out.append(
        "*Server CPU*: the server process's user+system time over the run, in % of one core; "
        "below 100% the server was not the bottleneck (the loopback round trip and wrk were). "
        "*CPU us/req*: that CPU time divided by the requests wrk completed — the cost per request, "
        "which is less sensitive to scheduling noise than req/s. *Other load*: busy time of the "
        "server's core not spent by the server, and of wrk's core not spent by wrk (kernel softirq "
        "for loopback included), i.e. other processes competing with the measurement; tail latency "
        f"reacts to a few percent of it. Load average {tp.load_before} before the runs, "
        f"{tp.load_after} after. Before each baseline/broker pair the bench waited for the whole "
        f"machine to drop below 10% busy, within a total budget ({res.settings.get('quiet-wait budget', '?')}"
        f"; {tp.quiet_waited:.0f} s spent), and a pair in which either run saw more than "
        f"{NOISY_PCT:g}% other load at {TARGET_CONNECTIONS} connections was measured again, at most "
        f"{res.settings.get('noisy-pair re-runs', '?')} times in the whole run; re-measured pairs "
        "stay in the table, marked, and are left out of the medians.\n"
    )
    out.append(
        f"Broker RSS: {mb(tp.broker_rss_kib_before):.1f} MB before the load, "
        f"{mb(tp.broker_rss_kib_after):.1f} MB after it.\n"
    )
    for plot in res.plots or []:
        out.append(f"![{plot}]({plot})\n")

    if "broker" in tp.profiles:
        out.append(profile_section(res))
    out.append("## 3. Start-up\n")
    out.append(
        "Wall time from just before `python -m broker run` is spawned to the first 200 from "
        "`/readyz` (polled every 5 ms). Ready means the default access token is cached, so this "
        "includes interpreter start, imports, binding both listeners and one STS + IAM round trip "
        "to the local fakes (no delay). RSS is `VmRSS` from `/proc/PID/status` right after ready; "
        "HWM is `VmHWM`.\n"
    )
    out.append(
        _md_table(
            ["Run", "Ready (s)", "RSS (MB)", "HWM (MB)"],
            [
                [str(i + 1), f"{r.ready_seconds:.3f}", f"{mb(r.rss_kib):.1f}", f"{mb(r.hwm_kib):.1f}"]
                for i, r in enumerate(st.runs)
            ]
            + [["**median**", f"**{st.ready_median:.3f}**", f"**{mb(st.rss_median_mib * 1024):.1f}**", ""]],
        )
        + "\n"
    )
    imp = st.imports
    out.append(
        f"Import cost of `{IMPORT}` (which pulls in the daemon and everything it serves with): "
        f"{imp.importtime_ms:.0f} ms cumulative under `python -X importtime -c 'import {IMPORT}'` "
        f"(one traced run); {imp.wall_ms:.0f} ms of wall time for `python -c 'import {IMPORT}'` over a "
        "bare `python -c pass` (median of 3 each; this also pays for tearing the modules down at "
        "exit). Where the import time goes, as self time summed per top-level package:\n"
    )
    out.append(_md_table(["Package", "self ms"], [[f"`{n}`", f"{v:.0f}"] for n, v in imp.heaviest]) + "\n")
    if st.sdks:
        out.append(
            "Cloud SDKs are imported only by the source that needs them (`build_source`): botocore for "
            "`aws1` credential files, azure-identity for `source = azure`. Each row is a fresh "
            f"process that imports `{IMPORT}`, checks that no cloud SDK is loaded yet, then imports the "
            "source module:\n"
        )
        out.append(
            _md_table(
                ["Source module", f"cloud SDK loaded by `{IMPORT}` alone", "import ms", "RSS added (MB)"],
                [
                    [
                        f"`{x.module}`",
                        "yes" if x.sdk_loaded_before else "no",
                        f"{x.import_ms:.0f}",
                        f"{mb(x.rss_added_kib):.1f}",
                    ]
                    for x in st.sdks
                ],
            )
            + "\n"
        )
    return "\n".join(out)


def profile_section(res: Results) -> str:
    tp = res.throughput
    prof, base_prof = tp.profiles["broker"], tp.profiles.get("baseline")
    broker = tp.summary("broker", TARGET_CONNECTIONS)
    base = tp.summary("baseline", TARGET_CONNECTIONS)
    cpu = broker.med("cpu_us_per_req") if broker else float("nan")
    base_cpu = base.med("cpu_us_per_req") if base else float("nan")
    out = ["### Where the time goes (py-spy)\n"]
    sampled = f"broker {prof.rps:,.0f} req/s, {prof.samples:,} samples"
    if base_prof:
        sampled = f"baseline {base_prof.rps:,.0f} req/s, {base_prof.samples:,} samples; " + sampled
    out.append(
        f"`py-spy record --rate {RATE} --format raw` on each server during one more "
        f"{round(tp.duration)} s wrk run at {TARGET_CONNECTIONS} connections ({sampled}; event-loop "
        "thread only). *us/req* scales each share by that server's median CPU cost per request from "
        f"the runs above (broker {cpu:.1f} us, baseline {base_cpu:.1f} us), so a column adds up to "
        "that cost. Buckets are assigned from the innermost frame outwards, first match wins; C code "
        "(sockets, the HTTP parser, multidict) is charged to the Python frame that called it. Sampling "
        "slows the servers down a little; the shares, not the absolute rates, are the point.\n"
    )
    groups, base_groups = dict(prof.groups), dict(base_prof.groups) if base_prof else {}
    names = sorted(set(groups) | set(base_groups), key=lambda n: -groups.get(n, 0.0))
    rows = []
    for name in names:
        share, b_share = groups.get(name, 0.0), base_groups.get(name, 0.0)
        rows.append(
            [
                name,
                f"{share:.1%}",
                f"{share * cpu:.1f}",
                f"{b_share * base_cpu:.1f}" if base_prof else "-",
                f"{share * cpu - b_share * base_cpu:+.1f}" if base_prof else "-",
            ]
        )
    out.append(
        _md_table(["Bucket", "Broker share", "Broker us/req", "Baseline us/req", "Extra us/req"], rows) + "\n"
    )
    out.append("Broker frames, inclusive (time in the frame and everything it called):\n")
    out.append(
        _md_table(
            ["Frame", "Share", "us/req"],
            [[f"`{k}`", f"{v:.1%}", f"{v * cpu:.1f}"] for k, v in prof.broker_inclusive],
        )
        + "\n"
    )
    out.append("Broker, top functions by self time:\n")
    out.append(
        _md_table(
            ["Function", "Share", "us/req"],
            [[f"`{k}`", f"{v:.1%}", f"{v * cpu:.1f}"] for k, v in prof.self_top],
        )
        + "\n"
    )
    return "\n".join(out)


def plots(res: Results, directory: Path) -> list[str]:
    """PNG plots next to the report, if matplotlib is importable; returns relative names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    tp = res.throughput
    conns = tp.connection_counts()
    if not conns:
        return []
    names = []
    xs = range(len(conns))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, server in ((-0.2, "baseline"), (0.2, "broker")):
        summaries = [tp.summary(server, c) for c in conns]
        values = [sm.med("rps") if sm else 0.0 for sm in summaries]
        ax.bar([x + offset for x in xs], values, width=0.4, label=server)
    ax.set_xticks(list(xs), [f"{c} conns" for c in conns])
    ax.set_ylabel("requests / s (median of rounds)")
    ax.set_title("Cached token: throughput (higher is better)")
    ax.legend()
    fig.tight_layout()
    name = "performance-throughput.png"
    fig.savefig(directory / name, dpi=110)
    plt.close(fig)
    names.append(name)

    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    labels = ("p50", "p90", "p99", "p99.9")
    for server, style in (("baseline", "--"), ("broker", "-")):
        for i, c in enumerate(conns):
            summary = tp.summary(server, c)
            if summary is None:
                continue
            values = [summary.med(n) for n in ("p50_ms", "p90_ms", "p99_ms", "p999_ms")]
            ax.plot(labels, values, style, color=f"C{i}", marker="o", label=f"{server} c={c}")
    ax.axhline(TARGET_P99_MS, color="grey", linewidth=0.8, label=f"{TARGET_P99_MS:g} ms (p99 target)")
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title("Cached token: latency percentiles (lower is better)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    name = "performance-latency.png"
    fig.savefig(directory / name, dpi=110)
    plt.close(fig)
    names.append(name)
    return names


def write(res: Results, path: Path, with_plots: bool) -> list[str]:
    """Write the report (and plots); return notices for the console."""
    return write_report(res, path, with_plots, markdown, plots)

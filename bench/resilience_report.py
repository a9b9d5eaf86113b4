"""The resilience report: console summary, docs/resilience.md and its PNG plots."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.abuse import BEGIN as ABUSE_BEGIN
from bench.common import write_report

if TYPE_CHECKING:
    from bench.fleet import PolicyRun
    from bench.load import LoadResult
    from bench.rotation import RotationResult
    from bench.shortlived import ShortLivedResult
    from bench.soak import SoakResult


@dataclass
class Results:
    machine: dict[str, str]
    command: str
    minutes: float
    pinned: bool
    load: LoadResult | None = None
    soak: SoakResult | None = None
    rotation: RotationResult | None = None
    shortlived: list[ShortLivedResult] | None = None  # one per upstream delay
    fleet: list[PolicyRun] | None = None
    wall_seconds: float = 0.0
    plots: list[str] = field(default_factory=list)


@dataclass
class Row:
    name: str
    result: str
    target: str
    status: str  # PASS / FAIL / MISS / n/a


def _status(ok: bool, fail: str = "FAIL") -> str:
    return "PASS" if ok else fail


def summary_rows(res: Results) -> list[Row]:
    rows: list[Row] = []
    if (ld := res.load) is not None:
        r = ld.run
        rows.append(
            Row(
                f"Load: {ld.connections} connections x {ld.seconds}s (wrk)",
                f"{r.requests:,} requests, {r.rps:,.0f} req/s, p99 {r.p99_ms:.2f} ms, errors {ld.errors}",
                "0 errors",
                _status(ld.passed),
            )
        )
    if (s := res.soak) is not None:
        rows.append(
            Row(
                f"Soak ({s.minutes:g} min, {s.lifetime} s tokens): token under min-serve-ttl served",
                f"{s.access_checked + s.id_checked:,} answers checked, min expires_in "
                f"{s.min_expires_in:g} s, "
                f"min ID-token time left {s.min_id_left:.1f} s, violations {len(s.violations)}",
                f"none (min-serve-ttl {s.min_serve_ttl} s)",
                _status(not s.violations),
            )
        )
        first, last = s.drift("rss_mib")
        rows.append(
            Row(
                "Soak: RSS (median of first / last quarter, after warm-up)",
                f"{first:.1f} -> {last:.1f} MiB (slope {s.slope_per_hour('rss_mib'):+.2f} MiB/h)",
                "flat (growth <= max(2 MiB, 5%))",
                _status(s.rss_flat, "MISS"),
            )
        )
        tasks = [x.tasks for x in s.steady()]
        t_first, t_last = s.drift("tasks")
        rows.append(
            Row(
                "Soak: asyncio tasks in the broker (median of first / last quarter; min-max)",
                f"{t_first:.0f} -> {t_last:.0f} ({min(tasks):.0f}-{max(tasks):.0f})",
                "flat (growth <= 2)",
                _status(s.tasks_flat, "MISS"),
            )
        )
    if (rr := res.rotation) is not None:
        w, o = rr.summary(True), rr.summary(False)
        rows.append(
            Row(
                f"Rotation: {rr.clients} clients over {len(rr.rotations)} rotations",
                f"p99 {w['p99']:.2f} ms at rotation vs {o['p99']:.2f} ms elsewhere; "
                f"answers >= 50 ms: {w['slow']:.0f} at rotation, {o['slow']:.0f} elsewhere; "
                f"requests that waited on a load (broker's cache counters): {rr.waited}; "
                f"min expires_in {rr.min_expires_in}; non-200 {rr.non_200}",
                "nobody waits on a refresh; none under min-serve-ttl",
                _status(rr.passed),
            )
        )
    for sl in res.shortlived or []:
        for client in dict.fromkeys(s.client for s in sl.series):
            broker, direct = sl.get(client, "broker"), sl.get(client, "direct")
            if broker is None or direct is None:
                continue
            rows.append(
                Row(
                    f"Short-lived, upstream {sl.delay * 1000:.0f} ms: {client}",
                    f"broker {broker.median * 1000:.0f} ms vs direct {direct.median * 1000:.0f} ms "
                    f"-> {sl.speedup(client):.2f}x, {(direct.median - broker.median) * 1000:.0f} ms saved",
                    "-",
                    "n/a" if not (broker.failures or direct.failures) else "FAIL",
                )
            )
    for f in res.fleet or []:
        sts, iam = f.sts, f.iam
        rows.append(
            Row(
                f"Fleet {f.brokers:,}: {f.name}",
                f"peak/mean per minute after 1 h: STS {sts[0]}/{sts[1]:.0f} = {sts[2]:.2f}, "
                f"IAM {iam[0]}/{iam[1]:.0f} = {iam[2]:.2f}",
                "<= 1.5",
                _status(f.passed, "MISS"),
            )
        )
    return rows


def console_table(rows: list[Row]) -> str:
    width = max((len(r.name) for r in rows), default=10)
    return "\n".join(f"{r.name:<{width}}  {r.status:<5} {r.result}" for r in rows)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


TESTS = (Path(__file__).parent / "resilience_tests.md").read_text()


def markdown(res: Results) -> str:
    m = res.machine
    out = [
        "# Resilience",
        "",
        "Generated by `python -m bench resilience` (see `bench/README.md`) from one run on the machine "
        "below, apart from the test list, which describes `tests/resilience/`. Regenerate rather than edit.",
        "",
        "```sh",
        res.command,
        "```",
        "",
        _md_table(
            ["", ""],
            [
                ["Date", m.get("date", "")],
                ["CPU", f"{m.get('cpu', '')} — `nproc` = {m.get('nproc', '')}"],
                ["OS", m.get("os", "")],
                [
                    "Python / aiohttp / wrk",
                    f"{m.get('python', '')} / {m.get('aiohttp', '')} / {m.get('wrk', '')}",
                ],
                ["Pinning", "broker core 0, wrk core 1" if res.pinned else "none"],
                ["Bench wall time", f"{res.wall_seconds:.0f} s"],
            ],
        ),
        "",
        "## Summary",
        "",
        _md_table(
            ["Measurement", "Result", "Target", "Status"],
            [[r.name, r.result, r.target, f"**{r.status}**"] for r in summary_rows(res)],
        ),
        "",
        "A MISS is a finding, not a failure of the run; FAIL means a guarantee did not hold.",
        "",
        TESTS,
    ]
    if res.load is not None:
        out += _load_section(res)
    if res.soak is not None:
        out += _soak_section(res)
    if res.rotation is not None:
        out += _rotation_section(res)
    if res.shortlived:
        out += _shortlived_section(res)
    if res.fleet:
        out += _fleet_section(res)
    out += [FINDINGS]
    return "\n".join(out) + "\n"


def _plot(res: Results, name: str, alt: str) -> list[str]:
    return [f"![{alt}]({name})", ""] if name in res.plots else []


def _load_section(res: Results) -> list[str]:
    ld = res.load
    assert ld is not None
    r = ld.run
    return [
        "## Sustained load",
        "",
        f"`python -m broker run` (via `bench.instrumented`) against the in-process fakes, warm; after a 2 s "
        f"warm-up, `wrk -t1 -c{ld.connections} -d{ld.seconds}s --latency -H 'Metadata-Flavor: Google'` "
        "on the "
        "token path (errors: wrk's socket errors plus non-2xx answers, from a Lua `done` hook).",
        "",
        _md_table(
            [
                "Requests",
                "req/s",
                "p50",
                "p90",
                "p99",
                "p99.9",
                "max",
                "Errors",
                "RSS before → after",
                "Tasks",
            ],
            [
                [
                    f"{r.requests:,}",
                    f"{r.rps:,.0f}",
                    f"{r.p50_ms:.2f} ms",
                    f"{r.p90_ms:.2f} ms",
                    f"{r.p99_ms:.2f} ms",
                    f"{r.p999_ms:.2f} ms",
                    f"{r.max_ms:.1f} ms",
                    f"{ld.errors} ({', '.join(f'{k} {v}' for k, v in r.errors.items())})",
                    f"{ld.rss_before_mib:.1f} → {ld.rss_after_mib:.1f} MiB",
                    f"{ld.tasks_before:.0f} → {ld.tasks_after:.0f}",
                ]
            ],
        ),
        "",
        f"Upstream calls during the whole run: STS {ld.sts_calls}, IAM {ld.iam_calls} (the start-up "
        "pre-warm).",
        "",
    ]


def _soak_section(res: Results) -> list[str]:
    s = res.soak
    assert s is not None
    first, last = s.drift("rss_mib")
    tasks = [x.tasks for x in s.steady()]
    fds = [x.fds for x in s.steady()]
    last_sample = s.samples[-1] if s.samples else None
    text = [
        "## Soak",
        "",
        f"**{s.minutes:g} minutes** (the default is 30: `--minutes`). The fakes issue {s.lifetime} s tokens; "
        f"the broker runs with `--refresh-before {s.refresh_before} --min-serve-ttl "
        f"{s.min_serve_ttl}`, so it "
        "renews every ~25-30 s (jittered; at least half the servable window after the mint). Nine "
        "client tasks "
        "keep asking: six for the default token, two for ten other scope sets in turn, one for ID tokens for "
        "three audiences (`format=full`). Every answer is checked: 200; an access token's `expires_in` >= "
        f"{s.min_serve_ttl} (the broker truncates the seconds left, so its strict bound shows as equality at "
        f"worst); an ID token's `exp` more than {s.min_serve_ttl} s after the request started. /metrics is "
        "sampled every 10 s; `bench_event_loop_tasks` is a bench-only gauge (`bench/instrumented.py` "
        "wraps the "
        "broker CLI and registers it): the broker exports no task count. The subject-token file is rotated "
        "every 10 minutes.",
        "",
        _md_table(
            ["", ""],
            [
                [
                    "Requests",
                    f"{s.requests:,} "
                    f"({', '.join(f'HTTP {k}: {v:,}' for k, v in sorted(s.statuses.items()))})",
                ],
                [
                    "Access tokens checked / min `expires_in`",
                    f"{s.access_checked:,} / {s.min_expires_in:g} s",
                ],
                ["ID tokens checked / min time left", f"{s.id_checked:,} / {s.min_id_left:.2f} s"],
                ["Distinct default tokens served (rotations + 1)", str(s.default_tokens_seen)],
                ["Subject-token file rotations", str(s.subject_rotations)],
                [
                    "Violations",
                    str(len(s.violations)) + ("" if not s.violations else f": {s.violations[:3]}"),
                ],
                [
                    "RSS, first → last quarter (median)",
                    f"{first:.1f} → {last:.1f} MiB, slope {s.slope_per_hour('rss_mib'):+.2f} MiB/h",
                ],
                [
                    "asyncio tasks (min / median / max)",
                    f"{min(tasks):.0f} / {sorted(tasks)[len(tasks) // 2]:.0f} / {max(tasks):.0f}",
                ],
                ["Open fds (min / max)", f"{min(fds):.0f} / {max(fds):.0f}"],
                [
                    "Upstream calls (STS / IAM)",
                    f"{last_sample.sts_calls:.0f} / {last_sample.iam_calls:.0f}" if last_sample else "-",
                ],
            ],
        ),
        "",
    ]
    return text + _plot(res, "resilience-soak.png", "Soak: RSS and asyncio tasks over time")


def _rotation_section(res: Results) -> list[str]:
    rr = res.rotation
    assert rr is not None
    w, o = rr.summary(True), rr.summary(False)
    text = [
        "## Herd and rotation under continuous load",
        "",
        f"{rr.clients} closed-loop clients (one keep-alive connection each) ask for the default token for "
        f"{rr.seconds:g} s. Tokens live 60 s (`--refresh-before 30 --min-serve-ttl 10`) and both fakes "
        "answer "
        "after 50 ms, so a request that waited on a refresh would take at least 50 ms. A rotation is "
        "the first "
        "answer carrying a new token; *at rotation* means requests started from 1 s before to 0.5 s after it "
        "(the refresh's upstream calls are in flight then). Latency is measured by the Python clients, so it "
        "includes their own scheduling (and that of the fakes, which share their process): a slow answer "
        "elsewhere is client-side noise. The exact check is the broker's own count of access-cache lookups "
        "that missed or joined an in-flight load during the run (`wif_broker_cache_lookups_total`, "
        f"result `miss` + `joined`): **{rr.waited}**. Refresh-ahead loads do not go through a lookup, so "
        "any client that had to wait for a token would show there.",
        "",
        _md_table(
            ["", "Answers", "p50", "p99", "max", ">= 50 ms"],
            [
                [
                    "At rotation",
                    f"{w['n']:,.0f}",
                    _ms(w["p50"]),
                    _ms(w["p99"]),
                    _ms(w["max"]),
                    f"{w['slow']:.0f}",
                ],
                [
                    "Elsewhere",
                    f"{o['n']:,.0f}",
                    _ms(o["p50"]),
                    _ms(o["p99"]),
                    _ms(o["max"]),
                    f"{o['slow']:.0f}",
                ],
            ],
        ),
        "",
        f"Rotations seen: {len(rr.rotations)} (at {', '.join(f'{t:.0f}' for t in rr.rotations)} s). "
        f"Min `expires_in` served: {rr.min_expires_in} s. Non-200: {rr.non_200}. Upstream calls: STS "
        f"{rr.sts_calls}, IAM {rr.iam_calls} (the pre-warm plus one per refresh of each cache: single-flight "
        "under load). Errors: " + (", ".join(rr.errors[:3]) or "none") + ".",
        "",
    ]
    return text + _plot(
        res, "resilience-rotation.png", "Latency of every request, with token rotations marked"
    )


def _shortlived_section(res: Results) -> list[str]:
    runs = res.shortlived or []
    rows = []
    for sl in runs:
        for client in dict.fromkeys(s.client for s in sl.series):
            b, d, f = sl.get(client, "broker"), sl.get(client, "direct"), sl.get(client, "floor")
            if b is None or d is None:
                continue
            rows.append(
                [
                    f"{sl.delay * 1000:.0f} ms",
                    f"`{client}`",
                    f"{b.median * 1000:.0f} ms ({b.spread[0] * 1000:.0f}-{b.spread[1] * 1000:.0f})",
                    f"{d.median * 1000:.0f} ms ({d.spread[0] * 1000:.0f}-{d.spread[1] * 1000:.0f})",
                    f"**{sl.speedup(client):.2f}x**",
                    f"{(d.median - b.median) * 1000:.0f} ms",
                    f"{b.cpu_median * 1000:.0f} / {d.cpu_median * 1000:.0f} ms",
                    f"{f.median * 1000:.0f} ms" if f and f.seconds else "-",
                    f"{sl.upstream_calls.get((client, 'broker'), 0)} / "
                    f"{sl.upstream_calls.get((client, 'direct'), 0)}",
                    f"{len(b.failures)} / {len(d.failures)}",
                ]
            )
    delays = " and ".join(f"{sl.delay * 1000:.0f} ms" for sl in runs)
    skipped = " ".join(dict.fromkeys(note for sl in runs for note in sl.skipped))
    return [
        "## Short-lived processes",
        "",
        f"One token per process, {runs[0].runs} invocations per client and mode (alternating), every fake "
        f"upstream delayed by {delays} (two runs), a fresh config directory per invocation. *Through "
        "the broker*: `GCE_METADATA_HOST`/`_IP`/`_ROOT` point at a warm broker. *Direct*: the same "
        "external_account file (`CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE` for gcloud, "
        "`GOOGLE_APPLICATION_CREDENTIALS` and `GOOGLE_CLOUD_PROJECT` for google-auth), so the client does "
        "STS + generateAccessToken itself. *Floor*: the client's start-up alone (`gcloud --version`; an "
        "interpreter importing google.auth).",
        "",
        _md_table(
            [
                "Upstream delay",
                "Client",
                "Through the broker",
                "Direct",
                "Speed-up",
                "Saved per invocation",
                "Client CPU (broker / direct)",
                "Floor",
                "Upstream calls (broker / direct)",
                "Failures",
            ],
            rows,
        ),
        "",
        "Wall times are medians (interquartile range in brackets); *client CPU* is the median user + "
        "system time of the client process, steadier than wall time when other work shares the machine. "
        "Direct, each invocation pays two upstream round trips (2 x the delay; over the internet add TLS "
        "set-up) plus the client's own STS/IAM code; through a warm broker it makes no upstream call (the "
        "*upstream calls* column counts what the fakes received during each mode's runs). "
        + _slower_note(runs)
        + skipped,
        "",
    ]


def _slower_note(runs: list[ShortLivedResult]) -> str:
    """Name the client and delay where going through the broker did not pay, if any."""
    slower = [
        (sl.delay, client)
        for sl in runs
        for client in dict.fromkeys(s.client for s in sl.series)
        if sl.speedup(client) < 1
    ]
    if not slower:
        return ""
    where = ", ".join(f"`{client}` at {delay * 1000:.0f} ms" for delay, client in slower)
    return (
        f"Slower through the broker: {where}. gcloud in metadata-server mode spends more CPU of its own "
        "(GCE detection, reading the account's metadata, other code paths; see the CPU column) than "
        "round trips that short save; the comparison turns once the upstream round trips cost more, "
        "as they do over the internet. "
    )


def _round3(x: float) -> int:
    """Three significant figures: an extrapolation is not exact to the broker."""
    return int(float(f"{x:.3g}"))


def _fleet_section(res: Results) -> list[str]:
    runs = res.fleet or []
    first = runs[0]
    rows = []
    for f in runs:
        sts, iam = f.sts, f.iam
        per_h = f.calls_per_broker_hour()
        rows.append(
            [
                f.name,
                f"{sts[3]:,}",
                f"{sts[0]:,} / {sts[1]:.0f} = **{sts[2]:.2f}**",
                f"{iam[0]:,} / {iam[1]:.0f} = **{iam[2]:.2f}**",
                f"{per_h[0]:.2f} / {per_h[1]:.2f}",
                "PASS" if f.passed else "MISS",
            ]
        )
    default = next((f for f in runs if f.name.startswith("default")), runs[-1])
    jitter_only = next((f for f in runs if f.jitter_fraction > 0 and not f.spread_first), None)
    n = first.brokers
    from bench.fleet import IAM_QUOTA_PER_MIN, STS_QUOTA_PER_MIN

    steady = default.sts[1]
    text = [
        "## Fleet scale (simulated)",
        "",
        f"{n:,} brokers started together, simulated over {first.hours:g} h with real lifetimes (3600 s "
        "tokens, refresh-before 600, min-serve-ttl 300). Each simulated broker is the chain's two caches "
        "as `TokenChain` builds them, the real `broker.cache.TokenCache` on one `ManualClock`: a "
        "federated cache (kept warm; its loader counts an STS call) and the default access cache (kept "
        "warm; its loader takes the federated token from the first cache and counts a generateAccessToken "
        "call). Rates are per simulated minute; *peak / mean* is over the minutes after the first hour "
        "(the target: <= 1.5). The policies differ only in `broker.cache.Policy` fields; the last row is "
        "the broker's `Policy()` as shipped.",
        "",
        _md_table(
            [
                "Policy",
                "STS peak, first hour",
                "STS peak / mean after 1 h",
                "IAM peak / mean after 1 h",
                "Calls per broker-hour (STS / IAM)",
                "<= 1.5",
            ],
            rows,
        ),
        "",
        *_plot(res, "resilience-fleet.png", "STS and IAM requests per minute for the fleet, by policy"),
    ]
    if jitter_only is not None:
        text += [
            "**Why jitter alone misses.** Jitter is drawn per token as a fraction of *one* lifetime "
            f"(`jitter_fraction` {jitter_only.jitter_fraction:g} x 3600 s = "
            f"{jitter_only.jitter_fraction * 3600:.0f} s). A fleet that starts in the same minute refreshes "
            "first within that one window, and each later refresh only adds another independent draw of "
            "the same width: the phases spread like a random walk (standard deviation ~ "
            f"{jitter_only.jitter_fraction * 3600 / math.sqrt(12):.0f} s x sqrt(cycles)), so they need "
            "hundreds of cycles (weeks) to cover the ~2,800 s cycle evenly: "
            f"{jitter_only.sts[2]:.2f} (STS) / {jitter_only.iam[2]:.2f} (IAM) peak/mean after the first "
            "hour. Raising `jitter_fraction` alone costs upstream calls on every token (each refresh comes "
            "earlier) and still leaves the second cycle peaked.",
            "",
        ]
    text += [
        "**What the broker does** (`broker/cache.py`, `Policy.spread_first_refresh`): each key's *first* "
        "refresh in a process is drawn uniformly between 60 s after the mint (`first_refresh_floor`) and "
        "its normal jittered refresh time; later refreshes are unchanged. The start-up herd's refreshes "
        "then begin with uniform phases, which the renewal cycle keeps: "
        f"{default.sts[2]:.2f} (STS) / {default.iam[2]:.2f} (IAM) peak/mean after the first hour; what "
        f"remains is the minute-to-minute noise of ~{default.sts[1]:.0f} random refreshes a minute. Cost: "
        "on average half a token lifetime less for the first token, i.e. about one extra STS + IAM call "
        "per key per process start, spread over the first ~47 min. `tests/test_cache.py` checks the "
        "spread (200 keys minted together: every tenth of the window gets 8-35 first refreshes; the "
        "second refresh keeps the normal bounds).",
        "",
        "**Quota arithmetic** (Google defaults per project: Security Token Service token exchange 6,000 "
        "requests/min; IAM Service Account Credentials generate-credentials 60,000 requests/min; see "
        "cloud.google.com/iam/quotas):",
        "",
        f"- Steady state (the mean after the first hour): each broker makes about {steady * 60 / n:.2f} "
        f"STS and {default.iam[1] * 60 / n:.2f} generateAccessToken calls per hour per cached key "
        "(one per ~47 min refresh cycle); "
        f"{n:,} brokers → ~{steady:.0f} STS/min = {100 * steady / STS_QUOTA_PER_MIN:.1f}% of the STS quota. "
        "IAM scales with keys: every extra scope set or ID-token audience a workload uses adds the same rate "
        f"again (so ~{IAM_QUOTA_PER_MIN / max(steady, 1):.0f} keys per broker before IAM's 60,000/min).",
        f"- Start-up: all {n:,} pre-warms land in the same minute: {first.sts[3]:,} STS calls "
        f"{'>' if first.sts[3] > STS_QUOTA_PER_MIN else '<='} 6,000/min. Beyond 6,000 brokers per project "
        "started in one minute, STS answers 429; the broker honours `Retry-After` (capped at 300 s) with "
        "backoff, so the herd drains over a few minutes, but readiness is late — roll out in waves of "
        "< 6,000 per minute per project.",
        f"- First hour with the default policy: peak {max(default.sts_per_min[1:60], default=0):,} STS/min "
        "after the start-up minute (the first refreshes, spread over ~47 min), so a fleet stays below the "
        f"STS quota up to ~{_round3(n * STS_QUOTA_PER_MIN / max(default.sts_per_min[1:60], default=1)):,} "
        "brokers per project once past its start-up minute. Without jitter every refresh of the fleet "
        "lands in one minute, forever.",
        "",
    ]
    return text


FINDINGS = """\
## Findings

Fixed while writing these tests (each case is now a test in `test_bad_upstreams.py`):

- **Bounded reads cut valid replies** (`broker/httpclient.py`). `resp.content.read(MAX_BODY + 1)`
  returns what has arrived, not up to the bound, so a reply split across reads was truncated and
  failed to parse (a 900 KB valid reply: 503), and an over-sized one slipped past the bound as "not
  JSON". It now reads in a loop up to the bound (and refuses a declared `Content-Length` over it at once).
- **Deeply nested JSON crashed the parsers.** `[[[[…` within 1 MiB raises `RecursionError` from
  `json.loads`, which no caller caught: a 500. `httpclient.loads` (used by `Reply.json()`, the error
  decoder and, since, `broker/sources/extract.py` for `format: json` token files and URL-source
  bodies) turns it into `ValueError`, i.e. the existing "is not valid JSON" 503.
- **Numbers that escaped the parsers' `except` clauses** (`broker/sts.py`, `broker/iam.py`).
  `"expires_in": 1e400` made `int(inf)` raise `OverflowError`, and a 400-digit integer overflowed the
  expiry arithmetic: STS's `expires_in` is now bounded (a week) and `OverflowError` caught. A numeric
  `expireTime` raised `AttributeError`; it must now be a string. All three are 503 naming the step.
- **Outbound timeouts could not be set by whoever builds the session.** `request()` defaulted to
  the module's 15 s `TIMEOUT`, overriding the session's; it now uses the session's own (`new_session()`
  still sets `TIMEOUT`), so a test builds the chain over a session with a 2 s timeout instead of
  patching the broker.
- **A fleet started together kept refreshing together** (`broker/cache.py`): see *Fleet scale*;
  the first refresh of each key is now spread over its lifetime.

Requests the HTTP parser refuses (a 64 KiB header, a 100 KiB URL, 10,000 headers) were each
logged by `aiohttp.server` at ERROR with a traceback, so any local process could fill the log at
will. `broker/daemon.py` now rewrites those records into one WARNING line naming the parser's error
(`refused a malformed HTTP request: LineTooLong (HTTP 400)`), without the request's bytes
(`test_load.py::test_oversized_request_heads_are_refused_with_4xx` checks each case).

Left alone: those 400s are aiohttp's own, built before any route or handler runs, so they go out
without `Metadata-Flavor: Google` and with `Server: Python/3.11 aiohttp/…`. No client sends such
requests; changing it means replacing aiohttp's request handler class.
"""


def plots(res: Results, directory: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names: list[str] = []
    if res.soak is not None and res.soak.samples:
        s = res.soak
        minutes = [x.t / 60 for x in s.samples]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 4.5), sharex=True)
        ax1.plot(minutes, [x.rss_mib for x in s.samples], color="C0")
        ax1.set_ylabel("RSS (MiB)")
        low = min(x.rss_mib for x in s.samples)
        ax1.set_ylim(bottom=max(0.0, low - 10), top=max(x.rss_mib for x in s.samples) + 10)
        ax1.set_title(f"Soak: {s.minutes:g} min, {s.lifetime} s tokens, {s.requests:,} requests")
        ax2.plot(minutes, [x.tasks for x in s.samples], color="C1", label="asyncio tasks")
        ax2.plot(minutes, [x.fds for x in s.samples], color="C2", label="open fds")
        ax2.set_ylabel("count")
        ax2.set_xlabel("minutes")
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize="small")
        fig.tight_layout()
        name = "resilience-soak.png"
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        names.append(name)
    if res.rotation is not None and res.rotation.answers:
        rr = res.rotation
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ok = [a for a in rr.answers if a.status == 200]
        ax.scatter([a.t for a in ok], [a.latency_ms for a in ok], s=1, alpha=0.3, label="request latency")
        for i, t in enumerate(rr.rotations):
            ax.axvline(t, color="C3", linewidth=0.8, label="token rotation" if i == 0 else None)
        ax.axhline(50, color="grey", linestyle="--", linewidth=0.8, label="upstream delay (50 ms)")
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title(f"Rotation under load: {rr.clients} clients, 60 s tokens")
        ax.legend(fontsize="small", loc="upper right")
        fig.tight_layout()
        name = "resilience-rotation.png"
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        names.append(name)
    if res.fleet:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
        for i, f in enumerate(res.fleet):
            hours = [m / 60 for m in range(len(f.sts_per_min))]
            ax1.plot(hours, f.sts_per_min, color=f"C{i}", linewidth=0.8, label=f.name)
            ax2.plot(hours, f.iam_per_min, color=f"C{i}", linewidth=0.8, label=f.name)
        for ax, what in ((ax1, "STS"), (ax2, "generateAccessToken")):
            ax.set_yscale("log")
            ax.set_ylabel(f"{what} / min")
            ax.axvline(1.0, color="grey", linestyle=":", linewidth=0.8)
        ax1.axhline(6000, color="C3", linestyle="--", linewidth=0.8, label="STS quota 6,000/min")
        ax1.set_title(f"Fleet of {res.fleet[0].brokers:,} brokers started together (simulated)")
        ax1.legend(fontsize="x-small", loc="upper right")
        ax2.set_xlabel("hours")
        fig.tight_layout()
        name = "resilience-fleet.png"
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def write(res: Results, path: Path, with_plots: bool) -> list[str]:
    """Write the report (and plots); return notices for the console. The abuse section at
    the end of the file (``python -m bench abuse --output``, from its begin marker on, the
    notes under it included) is another bench's and is kept."""
    existing = path.read_text() if path.exists() else ""
    at = existing.find(ABUSE_BEGIN)
    notices = write_report(res, path, with_plots, markdown, plots)
    if at >= 0:
        path.write_text(path.read_text().rstrip("\n") + "\n\n" + existing[at:])
    return notices


def save(res: Results, path: Path) -> None:
    """Raw results (bench dataclasses) for :func:`load`; a local file this bench wrote, nothing else."""
    path.write_bytes(pickle.dumps(res))


def load(path: Path) -> Results:
    results = pickle.loads(path.read_bytes())  # only files written by save() on this machine
    if not isinstance(results, Results):
        raise TypeError(f"{path} does not hold resilience results")
    return results

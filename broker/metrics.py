"""Every Prometheus metric of the broker, on one dedicated registry.

Names follow https://prometheus.io/docs/practices/naming/: the ``wif_broker_``
prefix, ``_total`` counters, ``_seconds`` histograms. Label values come only
from the enums below and are pre-created, so every series exists before its
first event and no request data (token, email, audience, path) can become a
label. The registry and these objects are the broker's only module-level state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from broker import __version__
from broker.tokens import TokenKind

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)


class Endpoint(StrEnum):
    ROOT = "root"
    LISTING = "listing"
    VALUE = "value"
    TOKEN = "token"
    IDENTITY = "identity"
    PASSTHROUGH = "passthrough"
    OTHER = "other"


class Upstream(StrEnum):
    AWS = "aws"
    AZURE = "azure"
    SUBJECT_TOKEN = "subject_token"
    STS = "sts"
    IAM = "iam"


class Outcome(StrEnum):
    OK = "ok"
    TRANSIENT = "transient"
    DENIED = "denied"


# The token kinds label cache metrics: the same enum as the tokens, not a copy of it.
Kind = TokenKind


class CacheResult(StrEnum):
    HIT = "hit"
    MISS = "miss"
    JOINED = "joined"


STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

BUILD_INFO = Info("wif_broker_build", "Version of the running broker.", registry=REGISTRY)
BUILD_INFO.info({"version": __version__})

UPSTREAM_CALLS = Counter(
    "wif_broker_upstream_requests_total",
    "Calls to upstream identity services by outcome.",
    ["upstream", "outcome"],
    registry=REGISTRY,
)
UPSTREAM_SECONDS = Histogram(
    "wif_broker_upstream_request_duration_seconds",
    "Latency of upstream identity calls.",
    ["upstream"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
REFRESHES = Counter(
    "wif_broker_refreshes_total", "Background refreshes by outcome.", ["kind", "outcome"], registry=REGISTRY
)
STALE_SERVED = Counter(
    "wif_broker_stale_tokens_served_total",
    "Tokens served while their refresh was failing (still valid beyond min-serve-ttl).",
    ["kind"],
    registry=REGISTRY,
)
AWS_PROVIDER = Gauge(
    "wif_broker_aws_credential_provider",
    "1 for the botocore credential provider currently supplying AWS credentials "
    "(env, assume-role-with-web-identity, container-role, iam-role, ...).",
    ["method"],
    registry=REGISTRY,
)
CACHE_EVICTIONS = Counter(
    "wif_broker_cache_evictions_total",
    "Keys dropped because a token cache reached its cap (max-scope-sets, max-audiences).",
    ["kind"],
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "wif_broker_rate_limited_total",
    "Cache misses refused with 429 because the upstream-rate budget was spent.",
    ["kind"],
    registry=REGISTRY,
)
DEFAULT_SERVABLE = Gauge(
    "wif_broker_default_token_servable",
    "1 while the default-scope access token is cached and servable; 0 during an outage "
    "(readiness stays latched while a retry is in progress).",
    registry=REGISTRY,
)
CACHED_TOKENS = Gauge("wif_broker_cached_tokens", "Tokens held per kind.", ["kind"], registry=REGISTRY)

for _kind in Kind:
    CACHED_TOKENS.labels(kind=_kind.value)
    for _outcome in Outcome:
        REFRESHES.labels(kind=_kind.value, outcome=_outcome.value)
    STALE_SERVED.labels(kind=_kind.value)
    CACHE_EVICTIONS.labels(kind=_kind.value)
    RATE_LIMITED.labels(kind=_kind.value)
for _upstream in Upstream:
    UPSTREAM_SECONDS.labels(upstream=_upstream.value)
    for _outcome in Outcome:
        UPSTREAM_CALLS.labels(upstream=_upstream.value, outcome=_outcome.value)


class Cell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class HotCounter(Collector):
    """A counter for the per-request path: a plain integer per label set.

    prometheus-client's Counter takes a lock per ``inc()``; these are only
    incremented on the event-loop thread, so an int add is enough. All label
    combinations are fixed (and exported from zero) at construction.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: dict[str, Iterable[str]],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labels)
        combos: list[tuple[str, ...]] = [()]
        for values in labels.values():
            combos = [(*combo, value) for combo in combos for value in values]
        self.cells = {combo: Cell() for combo in combos}
        registry.register(self)

    def cell(self, *labels: str) -> Cell:
        return self.cells[labels]

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, cell in self.cells.items():
            family.add_metric(list(labels), cell.value)
        yield family

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]


REQUESTS = HotCounter(
    "wif_broker_requests_total",
    "Metadata server requests by endpoint class and status class.",
    {"endpoint": [e.value for e in Endpoint], "status": STATUS_CLASSES},
)
CACHE_LOOKUPS = HotCounter(
    "wif_broker_cache_lookups_total",
    "Token cache lookups: hit, miss (started an upstream call) or joined (single-flight).",
    {"kind": [k.value for k in Kind], "result": [r.value for r in CacheResult]},
)


class _ExpiryCollector(Collector):
    """``wif_broker_token_expiry_seconds``: computed at scrape time, per kind.

    The soonest expiry among cached tokens of a kind, so an alert on "< 300"
    fires when the broker is about to run out of servable tokens.
    """

    def __init__(self) -> None:
        self.sources: dict[Kind, Callable[[], float | None]] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "wif_broker_token_expiry_seconds",
            "Seconds until the soonest-expiring cached token of each kind expires.",
            labels=["kind"],
        )
        for kind, source in self.sources.items():
            value = source()
            if value is not None:
                family.add_metric([kind.value], value)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


EXPIRY = _ExpiryCollector()
REGISTRY.register(EXPIRY)


_CLASSES = ("2xx", "2xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> str:
    return _CLASSES[min(status // 100, 5)]


def count_request(endpoint: Endpoint, status: int) -> None:
    REQUESTS.cells[(endpoint.value, status_class(status))].value += 1


def request_cells(endpoint: Endpoint) -> tuple[Cell, ...]:
    """The request counter's cells of one endpoint class, indexed by ``min(status // 100, 5)``:
    resolved once per route, so counting a request is an index and an add."""
    return tuple(REQUESTS.cells[(endpoint.value, c)] for c in _CLASSES)


# --------------------------------------------------------------------------------------------
# `wif-broker webhook` (SPEC §9): its own registry, so the sidecar's /metrics carries no
# webhook series and the webhook's carries no token series.

WEBHOOK_REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=WEBHOOK_REGISTRY)


class Admission(StrEnum):
    """What the webhook did with one AdmissionReview."""

    INJECTED = "injected"
    NOT_OPTED_IN = "not_opted_in"
    OPTED_OUT = "opted_out"
    ALREADY_INJECTED = "already_injected"
    REFUSED = "refused"
    NOT_A_POD = "not_a_pod"  # another kind or operation: allowed unpatched
    BAD_REQUEST = "bad_request"  # not an AdmissionReview v1 (HTTP 400)


class SaRead(StrEnum):
    OK = "ok"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    ERROR = "error"
    TIMEOUT = "timeout"


WEBHOOK_ADMISSIONS = HotCounter(
    "wif_broker_webhook_admissions_total",
    "AdmissionReviews answered by the webhook, by outcome.",
    {"outcome": [a.value for a in Admission]},
    registry=WEBHOOK_REGISTRY,
)
WEBHOOK_SA_READS = HotCounter(
    "wif_broker_webhook_serviceaccount_reads_total",
    "ServiceAccount reads from the API server, by outcome.",
    {"outcome": [r.value for r in SaRead]},
    registry=WEBHOOK_REGISTRY,
)
WEBHOOK_SECONDS = Histogram(
    "wif_broker_webhook_admission_duration_seconds",
    "Time from an AdmissionReview's arrival to its answer.",
    buckets=LATENCY_BUCKETS,
    registry=WEBHOOK_REGISTRY,
)
WEBHOOK_TLS_RELOADS = Counter(
    "wif_broker_webhook_tls_reloads_total",
    "Reloads of the serving certificate after its files changed, by outcome.",
    ["outcome"],
    registry=WEBHOOK_REGISTRY,
)
for _result in ("ok", "error"):
    WEBHOOK_TLS_RELOADS.labels(outcome=_result)

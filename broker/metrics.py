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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from broker import __version__

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


class Kind(StrEnum):
    FEDERATED = "federated"
    ACCESS = "access"
    ID = "id"


class CacheResult(StrEnum):
    HIT = "hit"
    MISS = "miss"
    JOINED = "joined"


STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

BUILD_INFO = Info("wif_broker_build", "Version of the running broker.", registry=REGISTRY)
BUILD_INFO.info({"version": __version__})

REQUESTS = Counter(
    "wif_broker_requests_total",
    "Metadata server requests by endpoint class and status class.",
    ["endpoint", "status"],
    registry=REGISTRY,
)
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
CACHE_LOOKUPS = Counter(
    "wif_broker_cache_lookups_total",
    "Token cache lookups: hit, miss (started an upstream call) or joined (single-flight).",
    ["kind", "result"],
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
CACHED_TOKENS = Gauge("wif_broker_cached_tokens", "Tokens held per kind.", ["kind"], registry=REGISTRY)

for _kind in Kind:
    CACHED_TOKENS.labels(kind=_kind.value)
    for _outcome in Outcome:
        REFRESHES.labels(kind=_kind.value, outcome=_outcome.value)
    for _result in CacheResult:
        CACHE_LOOKUPS.labels(kind=_kind.value, result=_result.value)
    STALE_SERVED.labels(kind=_kind.value)
for _upstream in Upstream:
    UPSTREAM_SECONDS.labels(upstream=_upstream.value)
    for _outcome in Outcome:
        UPSTREAM_CALLS.labels(upstream=_upstream.value, outcome=_outcome.value)
for _endpoint in Endpoint:
    for _status in STATUS_CLASSES:
        REQUESTS.labels(endpoint=_endpoint.value, status=_status)


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


def status_class(status: int) -> str:
    return f"{min(max(status // 100, 2), 5)}xx"


# Resolved once: .labels() costs a lock and a dict build per call, on every request.
_REQUEST_CHILDREN = {
    (endpoint, status): REQUESTS.labels(endpoint=endpoint.value, status=status)
    for endpoint in Endpoint
    for status in STATUS_CLASSES
}


def count_request(endpoint: Endpoint, status: int) -> None:
    _REQUEST_CHILDREN[(endpoint, status_class(status))].inc()

"""Reads one ServiceAccount from the API server, through kubernetes_asyncio (SPEC §9).

In-cluster config (the pod's service-account token, refreshed by the library) or
``KUBECONFIG`` when set. Every read is live, never from an informer cache: a pod
admitted against a stale cache is how peers silently skip injection. The read has a
hard budget, so a hanging API server becomes a refusal well inside the API server's
own webhook timeout (≤ 10 s) instead of an unexplained timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kubernetes_asyncio import client, config

from broker.errors import ConfigError
from broker.metrics import SaRead

READ_BUDGET_SECONDS = 6.0  # the AdmissionReview answer must beat the webhook's 10 s timeout
MAX_CONNECTIONS = 64
MAX_BODY_BYTES = 1024 * 1024  # a ServiceAccount is a few KB; bounded like every other read


ReadOutcome = SaRead


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    namespace: str
    name: str
    annotations: Mapping[str, str]


class ReadError(Exception):
    """The ServiceAccount could not be read; ``problem`` and ``fix`` go into the refusal."""

    def __init__(self, outcome: ReadOutcome, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.outcome, self.problem, self.fix = outcome, problem, fix


class ServiceAccountReader:
    """Owns one ApiClient (one connection pool); create with :meth:`open`, close with :meth:`close`."""

    def __init__(self, api: client.ApiClient, budget_seconds: float) -> None:
        self._api = api
        self._core = client.CoreV1Api(api)
        self._budget = budget_seconds

    @classmethod
    async def open(
        cls, environ: Mapping[str, str], budget_seconds: float = READ_BUDGET_SECONDS
    ) -> ServiceAccountReader:
        """Configure from ``KUBECONFIG`` when set, else the in-cluster service account."""
        configuration = client.Configuration()
        kubeconfig = environ.get("KUBECONFIG")
        try:
            if kubeconfig:
                # One file: a colon-separated list is kubectl's merge feature, not needed here.
                path = kubeconfig.split(os.pathsep)[0]
                await config.load_kube_config(config_file=path, client_configuration=configuration)
            else:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError, ValueError) as exc:
            where = "KUBECONFIG" if kubeconfig else "in-cluster service account"
            raise ConfigError(
                "KUBECONFIG", f"cannot configure the Kubernetes client from the {where}: {exc}"
            ) from None
        configuration.proxy = _proxy(configuration.host or "", environ)
        # HTTP/1.1 (aiohttp has no HTTP/2 multiplexing like client-go): one connection per
        # read in flight. The default, 5 x CPUs, queued a burst of 50 reviews behind 10.
        configuration.connection_pool_maxsize = MAX_CONNECTIONS
        api = client.ApiClient(configuration)
        # The client's session has trust_env on, so aiohttp re-reads the proxy variables and
        # ~/.netrc (on a worker thread) for every request: over 1 ms of CPU per review, more
        # than the rest of the read (bench/webhook.py). The proxy is resolved once, above.
        session = api.rest_client.pool_manager
        if hasattr(session, "_trust_env"):
            session._trust_env = False
        return cls(api, budget_seconds)

    async def close(self) -> None:
        await self._api.close()

    async def read(self, namespace: str, name: str) -> ServiceAccount:
        what = f"ServiceAccount {namespace}/{name}"
        try:
            async with asyncio.timeout(self._budget):
                # Raw response: the client's model deserialisation (dateutil on every
                # timestamp) cost more CPU than the rest of the review (bench/webhook.py).
                response: Any = await self._core.read_namespaced_service_account(
                    name, namespace, _preload_content=False, _request_timeout=self._budget
                )
                try:
                    body = await response.content.read(MAX_BODY_BYTES + 1)
                finally:
                    response.release()
        except TimeoutError:
            raise ReadError(
                ReadOutcome.TIMEOUT,
                f"the API server did not return {what} within {self._budget:.0f} s",
                "check the API server's health; the pod can be created again once it answers",
            ) from None
        except Exception as exc:  # the client raises aiohttp/SSL/OS errors as they come
            raise ReadError(
                ReadOutcome.ERROR,
                f"cannot reach the API server to read {what} ({type(exc).__name__})",
                "check the webhook's logs and its connection to the API server",
            ) from None
        if response.status != 200:
            raise _classify(int(response.status), what)
        return _parse(body, namespace, name, what)


def _parse(body: bytes, namespace: str, name: str, what: str) -> ServiceAccount:
    """The annotations of a ServiceAccount object; anything else is an API server error."""
    annotations: object = None
    try:
        data = json.loads(body) if len(body) <= MAX_BODY_BYTES else None
        if isinstance(data, dict) and data.get("kind") == "ServiceAccount":
            annotations = (data.get("metadata") or {}).get("annotations") or {}
    except (ValueError, AttributeError):
        pass
    if not isinstance(annotations, dict):
        raise ReadError(
            ReadOutcome.ERROR,
            f"the API server's answer for {what} is not a ServiceAccount",
            "check the API server (or a proxy in front of it)",
        )
    return ServiceAccount(namespace, name, {str(k): str(v) for k, v in annotations.items()})


def _proxy(server: str, environ: Mapping[str, str]) -> str | None:
    """HTTPS_PROXY for the API server unless NO_PROXY exempts it, as client-go does."""
    proxies = {k.lower(): v for k, v in environ.items() if k.lower() in ("https_proxy", "no_proxy") and v}
    host = urlsplit(server).hostname or ""
    if "https_proxy" not in proxies:
        return None
    for entry in proxies.get("no_proxy", "").split(","):
        entry = entry.strip().lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    return proxies["https_proxy"]


def _classify(status: int, what: str) -> ReadError:
    if status == 404:
        return ReadError(ReadOutcome.NOT_FOUND, f"{what} does not exist", f"create {what} before the pod")
    if status in (401, 403):
        return ReadError(
            ReadOutcome.FORBIDDEN,
            f"the webhook may not read {what} (HTTP {status})",
            "grant the webhook's ServiceAccount get on serviceaccounts (the chart's ClusterRole)",
        )
    return ReadError(
        ReadOutcome.ERROR,
        f"the API server answered HTTP {status} reading {what}",
        "retry; check the API server's health if it persists",
    )

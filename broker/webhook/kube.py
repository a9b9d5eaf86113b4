"""Reads one ServiceAccount from the API server, through kubernetes_asyncio (SPEC §9).

In-cluster config (the pod's service-account token, refreshed by the library) or
``KUBECONFIG`` when set. Every read is live, never from an informer cache: a pod
admitted against a stale cache is how peers silently skip injection. The read has a
hard budget, so a hanging API server becomes a refusal well inside the API server's
own webhook timeout (≤ 10 s) instead of an unexplained timeout.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from broker.errors import ConfigError
from broker.metrics import SaRead

READ_BUDGET_SECONDS = 6.0  # the AdmissionReview answer must beat the webhook's 10 s timeout


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
        return cls(client.ApiClient(configuration), budget_seconds)

    async def close(self) -> None:
        await self._api.close()

    async def read(self, namespace: str, name: str) -> ServiceAccount:
        what = f"ServiceAccount {namespace}/{name}"
        try:
            async with asyncio.timeout(self._budget):
                sa: Any = await self._core.read_namespaced_service_account(
                    name, namespace, _request_timeout=self._budget
                )
        except TimeoutError:
            raise ReadError(
                ReadOutcome.TIMEOUT,
                f"the API server did not return {what} within {self._budget:.0f} s",
                "check the API server's health; the pod can be created again once it answers",
            ) from None
        except ApiException as exc:
            raise _classify(exc, what) from None
        except Exception as exc:  # the client raises aiohttp/SSL/OS errors as they come
            raise ReadError(
                ReadOutcome.ERROR,
                f"cannot reach the API server to read {what} ({type(exc).__name__})",
                "check the webhook's logs and its connection to the API server",
            ) from None
        annotations = (sa.metadata.annotations if sa.metadata else None) or {}
        return ServiceAccount(namespace, name, {str(k): str(v) for k, v in annotations.items()})


def _classify(exc: ApiException, what: str) -> ReadError:
    status = int(exc.status or 0)
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

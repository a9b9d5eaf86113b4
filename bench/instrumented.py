"""``python -m bench.instrumented run …``: the broker's own CLI plus one bench-only gauge.

The soak needs the broker's asyncio task count, which the broker does not
export. This wrapper registers ``bench_event_loop_tasks`` (tasks alive in the
event loop, computed at scrape time: the /metrics handler runs on that loop)
on the broker's registry and then runs ``broker.cli.main`` unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from broker import cli, metrics

TASKS_METRIC = "bench_event_loop_tasks"


class _LoopTasks(Collector):
    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        family = GaugeMetricFamily(TASKS_METRIC, "asyncio tasks alive in the broker's event loop")
        family.add_metric([], len(asyncio.all_tasks(loop)))
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


def main() -> int:
    metrics.REGISTRY.register(_LoopTasks())
    return cli.main()


if __name__ == "__main__":
    raise SystemExit(main())

"""Prometheus metrics for what Flower does not export: the length of every model's
queue and the messages taken but not yet acknowledged, Redis' memory and its
maxmemory, workers alive and dead, and the tasks recovered from dead workers or
sent again. (Per-job progress is what
``imgq status`` shows; it is not exported here.)

    imgq metrics --port 9808        # then scrape http://host:9808/metrics

Values are read from the broker's Redis at each scrape (LLEN, HLEN, INFO memory:
constant time), so the exporter holds no state and any number of them can run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.kombu_redis import UNACKED_KEY
from shared.liveness import BROKER_ERRORS, RECOVERED_KEY, RESENT_KEY, BrokerRedis, Liveness
from shared.priority import queue_lists
from shared.registry import queue_for

log = logging.getLogger(__name__)


class QueueCollector(Collector):
    """Collects queue lengths from the broker's Redis for the given models at each scrape
    (the queues are there, whatever Redis the job records and results live on)."""

    def __init__(self, broker: BrokerRedis, models: Sequence[str]) -> None:
        self.broker = broker
        self.models = list(models)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The metric families, freshly read."""
        up = GaugeMetricFamily("imgq_redis_up", "1 when Redis answered this scrape")
        queued = GaugeMetricFamily(
            "imgq_queue_length",
            "Tasks waiting in a model's queue (each task is one chunk of images)",
            labels=["model", "queue"],
        )
        unacked = GaugeMetricFamily(
            "imgq_unacked_tasks",
            "Tasks delivered to workers and not yet acknowledged (running or prefetched)",
        )
        used = GaugeMetricFamily(
            "imgq_redis_memory_used_bytes",
            "Memory Redis uses (INFO memory: used_memory); at maxmemory it refuses writes",
        )
        limit = GaugeMetricFamily(
            "imgq_redis_memory_max_bytes",
            "Redis' maxmemory (0: no limit but the host's memory)",
        )
        try:
            memory = self.broker.client.info("memory")
            pipe = self.broker.client.pipeline(transaction=False)
            for model in self.models:
                for key in queue_lists(queue_for(model)):  # one list per priority level
                    pipe.llen(key)
            pipe.hlen(UNACKED_KEY)
            values = pipe.execute()
        except BROKER_ERRORS as exc:
            log.warning("metrics: Redis unreachable: %s", exc)
            self.broker.close()
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        per_model = len(values[:-1]) // max(1, len(self.models))
        for i, model in enumerate(self.models):
            length = sum(values[i * per_model : (i + 1) * per_model])
            queued.add_metric([model, queue_for(model)], float(length))
        unacked.add_metric([], float(values[-1]))
        used.add_metric([], float(memory.get("used_memory", 0)))
        limit.add_metric([], float(memory.get("maxmemory", 0)))
        yield up
        yield queued
        yield unacked
        yield used
        yield limit


class LivenessCollector(Collector):
    """Collects worker liveness and recovery counts from the broker's Redis at each scrape."""

    def __init__(self, broker: BrokerRedis) -> None:
        self.broker = broker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The metric families, freshly read."""
        try:
            client = self.broker.client
            workers = Liveness(client, timeout=0).workers()
            recovered_raw, resent_raw = client.mget([RECOVERED_KEY, RESENT_KEY])
        except BROKER_ERRORS as exc:
            log.warning("metrics: Redis unreachable: %s", exc)
            self.broker.close()
            return
        listed = GaugeMetricFamily(
            "imgq_workers", "Workers by state (dead: heartbeat expired)", labels=["state"]
        )
        alive = sum(1 for w in workers if w.alive)
        listed.add_metric(["alive"], float(alive))
        listed.add_metric(["dead"], float(len(workers) - alive))
        recovered = CounterMetricFamily(
            "imgq_tasks_recovered",
            "Tasks put back on their queues because the worker holding them was dead",
        )
        recovered.add_metric([], float(recovered_raw or 0))
        resent = CounterMetricFamily(
            "imgq_tasks_resent",
            "Tasks sent again by the sweep: in no queue, held by no worker, without a result",
        )
        resent.add_metric([], float(resent_raw or 0))
        yield listed
        yield recovered
        yield resent

"""A worker's own Prometheus metrics, labelled by model: what an inference server shows.

Off by default: with ``IMGQ_WORKER_METRICS_PORT`` set (e.g. 9809) each worker process
serves ``http://IMGQ_WORKER_METRICS_ADDR:PORT/metrics`` (address default 127.0.0.1;
containers set 0.0.0.0). While off, nothing is recorded: the hooks are a ``None`` check.

Queue lengths come from ``imgq metrics`` (Redis), task events from Flower; these
come from inside the worker: batch fill, time waiting for a batch, model time,
decode time, per-image errors by code, redeliveries and duplicate deliveries, whether
a store refuses writes, device memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from shared.schemas import ErrorCode

log = logging.getLogger(__name__)

# Batch sizes: powers of two up to the largest allowed batch (4096).
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(13))
# Model calls take from under a millisecond (a no-op model) to minutes (BiT on a CPU).
MODEL_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120
)  # fmt: skip
WAIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
DECODE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 10)

IMAGES = Counter(
    "imgq_worker_images_classified", "Images the model classified (errors excluded)", ["model"]
)
MODEL_CALLS = Counter("imgq_worker_model_calls", "Calls of the model on a batch", ["model"])
MODEL_FAILURES = Counter(
    "imgq_worker_model_call_failures",
    "Model calls that raised (their images are retried)",
    ["model"],
)
BATCH_SIZE = Histogram(
    "imgq_worker_batch_size",
    "Images per model call (before padding to a fixed size)",
    ["model"],
    buckets=BATCH_SIZE_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "imgq_worker_batch_wait_seconds",
    "Time the oldest image of a batch waited, decoded, before the model call began",
    ["model"],
    buckets=WAIT_SECONDS_BUCKETS,
)
MODEL_SECONDS = Histogram(
    "imgq_worker_model_call_seconds",
    "Duration of a model call on one batch",
    ["model"],
    buckets=MODEL_SECONDS_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "imgq_worker_decode_seconds",
    "Time to read (or fetch) and decode one image",
    ["model"],
    buckets=DECODE_SECONDS_BUCKETS,
)
IMAGE_ERRORS = Counter(
    "imgq_worker_image_errors", "Per-image error records, by error code", ["model", "code"]
)
REDELIVERED = Counter(
    "imgq_worker_tasks_redelivered",
    "Tasks delivered again after a worker died with them (images then run one by one)",
    ["model"],
)
DUPLICATES = Counter(
    "imgq_worker_tasks_duplicate",
    "Deliveries of a task already finished: acknowledged without running the model",
    ["model"],
)
STORE_UNAVAILABLE = Gauge(
    "imgq_store_unavailable",
    "1 while this worker cannot write to a store (Redis full or away, PostgreSQL down "
    "or full): it takes no new task until writes succeed again",
    ["store"],
)
CACHE_HITS = Counter(
    "imgq_worker_cache_hits",
    "Images whose result came from the result cache (not decoded, no model call)",
    ["model"],
)
CACHE_MISSES = Counter(
    "imgq_worker_cache_misses",
    "Images looked up in the result cache and not found (then computed and stored)",
    ["model"],
)
WARMUP_SECONDS = Gauge(
    "imgq_worker_warmup_seconds", "Time spent tracing every fixed batch size at start", ["model"]
)


@dataclass(frozen=True)
class ModelMetrics:
    """One model's metric children, looked up once (labels() takes a lock each time)."""

    images: Counter
    calls: Counter
    failures: Counter
    batch_size: Histogram
    wait_seconds: Histogram
    model_seconds: Histogram
    decode_seconds: Histogram
    cache_hits: Counter
    cache_misses: Counter

    def record_batch(self, size: int, waited: float, seconds: float) -> None:
        """Count one successful model call on ``size`` images."""
        self.images.inc(size)
        self.calls.inc()
        self.batch_size.observe(size)
        self.wait_seconds.observe(waited)
        self.model_seconds.observe(seconds)


_enabled = False


def enable() -> None:
    """Record metrics from now on (the server, or a benchmark, reads them)."""
    global _enabled
    _enabled = True
    STORE_UNAVAILABLE.labels("redis").set(0.0)  # a series from the start, for alerts


@cache
def _children(model: str) -> ModelMetrics:
    # Series at zero from the start, so that rate() and the dashboard see them
    # before the first error or redelivery.
    REDELIVERED.labels(model)
    DUPLICATES.labels(model)
    for code in ErrorCode:
        IMAGE_ERRORS.labels(model, code.value)
    return ModelMetrics(
        images=IMAGES.labels(model),
        calls=MODEL_CALLS.labels(model),
        failures=MODEL_FAILURES.labels(model),
        batch_size=BATCH_SIZE.labels(model),
        wait_seconds=QUEUE_WAIT.labels(model),
        model_seconds=MODEL_SECONDS.labels(model),
        decode_seconds=DECODE_SECONDS.labels(model),
        cache_hits=CACHE_HITS.labels(model),
        cache_misses=CACHE_MISSES.labels(model),
    )


def for_model(model: str) -> ModelMetrics | None:
    """The model's metrics, or None while metrics are off (nothing to record)."""
    return _children(model) if _enabled else None


def record_task(model: str, records: Iterable[Mapping[str, object]], *, redelivered: bool) -> None:
    """Count a finished task's per-image errors by code, and whether it was redelivered."""
    if not _enabled:
        return
    for record in records:
        error = record.get("error")
        if isinstance(error, dict):
            IMAGE_ERRORS.labels(model, str(error.get("code"))).inc()
    if redelivered:
        REDELIVERED.labels(model).inc()


def record_duplicate(model: str) -> None:
    """Count a delivery of a finished task, skipped without a model call."""
    if _enabled:
        DUPLICATES.labels(model).inc()


def record_store_unavailable(store: str, unavailable: bool) -> None:
    """Publish whether ``store`` ("redis", "postgresql") refuses this worker's writes."""
    if _enabled:
        STORE_UNAVAILABLE.labels(store).set(1.0 if unavailable else 0.0)


def record_warmup(model: str, seconds: float) -> None:
    """Publish how long a model's warm-up took."""
    if _enabled:
        WARMUP_SECONDS.labels(model).set(seconds)


class DeviceMemoryCollector(Collector):
    """Device memory TensorFlow reports (GPUs), read at each scrape; nothing on a CPU host.

    Labelled with the host's name of each GPU (its index or UUID), not TensorFlow's
    "GPU:0", which is whichever GPU the process was given.
    """

    def __init__(self, devices: Iterable[str], labels: Iterable[str] | None = None) -> None:
        self.devices = list(devices)
        self.labels = list(labels) if labels is not None else list(self.devices)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Current and peak bytes allocated by TensorFlow per device."""
        if not self.devices:
            return
        import tensorflow as tf

        family = GaugeMetricFamily(
            "imgq_worker_device_memory_bytes",
            "Device memory TensorFlow holds (kind=current) and its peak (kind=peak); "
            "device: the host's GPU index or UUID",
            labels=["device", "kind"],
        )
        for device, label in zip(self.devices, self.labels, strict=True):
            try:
                info = tf.config.experimental.get_memory_info(device)
            except (ValueError, RuntimeError):  # not reported for this device
                continue
            family.add_metric([label, "current"], float(info["current"]))
            family.add_metric([label, "peak"], float(info["peak"]))
        yield family


def serve(addr: str, port: int) -> None:
    """Enable recording and serve /metrics on ``addr:port`` from a daemon thread."""
    enable()
    start_http_server(port, addr=addr)
    log.info("worker metrics on http://%s:%d/metrics", addr, port)


def watch_devices(gpus: Iterable[str], labels: Iterable[str]) -> None:
    """Export the memory of these devices (names like /physical_device:GPU:0), labelled
    with the host's names of them (``workers.gpu.physical_labels``)."""
    if not _enabled:
        return
    # get_memory_info takes logical names ("GPU:0").
    names = [name.split("physical_device:")[-1] for name in gpus]
    if names:
        REGISTRY.register(DeviceMemoryCollector(names, labels))

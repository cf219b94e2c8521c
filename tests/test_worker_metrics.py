"""A real worker's /metrics against the job it ran; warm-up before the worker answers ping."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.api import Client
from shared.settings import Settings
from tests.conftest import ROOT, WorkerProcess, free_port, renamed_model_file, wait_for

pytestmark = pytest.mark.slow

# A model only the worker of this module serves (others in the session serve t1001).
MODEL = "tmetrics"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics: (name, sorted labels) -> value."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def models_file(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models file with MODEL (the t1001 SavedModel under another name)."""
    return renamed_model_file(models_dir, tmp_path_factory.mktemp("metrics-models"), MODEL)


@pytest.fixture(scope="module")
def metrics_worker(
    start_worker: Callable[..., WorkerProcess], models_file: Path
) -> tuple[WorkerProcess, int]:
    """A worker serving MODEL with its /metrics on a free loopback port."""
    port = free_port()
    env = {"IMGQ_WORKER_METRICS_PORT": str(port), "IMGQ_MODELS_FILE": str(models_file)}
    return start_worker(MODEL, name="metrics", env=env), port


def test_counters_match_the_job(
    metrics_worker: tuple[WorkerProcess, int],
    imgq_env: dict[str, str],
    models_file: Path,
    photos: Path,
    tmp_path: Path,
) -> None:
    _, port = metrics_worker
    client = Client(Settings(broker_url=imgq_env["IMGQ_BROKER_URL"], models_file=models_file))
    before = scrape(port)
    good = sorted(str(p) for p in photos.glob("*.jpg"))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all" * 10)
    sources = [*good * 4, str(empty), str(junk), str(tmp_path / "missing.jpg")]
    job = client.submit(sources, models=[MODEL], chunk_size=5)
    assert job.wait(progress=False, timeout=120).finished
    records = job.results()
    errors = Counter(r.error.code.value for r in records if r.error)
    assert errors == {"empty_file": 1, "not_an_image": 1, "not_found": 1}
    ok = len(records) - sum(errors.values())

    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("imgq_worker_images_classified_total", model=MODEL) == ok
    for code, n in errors.items():
        assert delta("imgq_worker_image_errors_total", model=MODEL, code=code) == n
    # The batch-size histogram: its sum is the images classified, its count the calls.
    assert delta("imgq_worker_batch_size_sum", model=MODEL) == ok
    calls = delta("imgq_worker_model_calls_total", model=MODEL)
    assert calls >= ok / 8
    assert delta("imgq_worker_batch_size_count", model=MODEL) == calls
    assert delta("imgq_worker_batch_size_bucket", model=MODEL, le="+Inf") == calls
    assert delta("imgq_worker_batch_size_bucket", model=MODEL, le="8.0") == calls
    assert delta("imgq_worker_model_call_seconds_count", model=MODEL) == calls
    assert delta("imgq_worker_batch_wait_seconds_count", model=MODEL) == calls
    assert delta("imgq_worker_model_call_seconds_sum", model=MODEL) > 0
    # Every image is read; the missing one fails before any decoding, but is timed too.
    assert delta("imgq_worker_decode_seconds_count", model=MODEL) == len(sources)
    assert delta("imgq_worker_tasks_redelivered_total", model=MODEL) == 0
    assert value(after, "imgq_worker_warmup_seconds", model=MODEL) > 0


def test_a_duplicate_of_a_finished_task_costs_no_model_call(
    metrics_worker: tuple[WorkerProcess, int],
    imgq_env: dict[str, str],
    models_file: Path,
    photos: Path,
) -> None:
    worker, port = metrics_worker
    client = Client(Settings(broker_url=imgq_env["IMGQ_BROKER_URL"], models_file=models_file))
    images = sorted(str(p) for p in photos.glob("*.jpg"))
    job = client.submit(images, models=[MODEL], chunk_size=len(images))
    job.wait(progress=False, timeout=60)
    before = scrape(port)
    # Delivered again after it finished (a broker reconnect, a failover, two sweeps).
    job.send_chunk(MODEL, 0)
    wait_for(
        lambda: (
            value(scrape(port), "imgq_worker_tasks_duplicate_total", model=MODEL)
            > value(before, "imgq_worker_tasks_duplicate_total", model=MODEL)
        ),
        30,
        "the duplicate to be acknowledged",
    )
    after = scrape(port)
    for name in ("imgq_worker_model_calls_total", "imgq_worker_decode_seconds_count"):
        assert value(after, name, model=MODEL) == value(before, name, model=MODEL), name
    assert sorted(r.image for r in job.results()) == images
    assert "has already finished: this delivery is acknowledged, not run" in worker.output()


def test_a_duplicate_while_its_worker_lives_is_no_crash(
    metrics_worker: tuple[WorkerProcess, int],
    imgq_env: dict[str, str],
    models_file: Path,
    photos: Path,
) -> None:
    """The same task delivered twice at once, both times to this live worker: neither
    delivery is taken for one after a crash (no image-by-image run, no redelivery)."""
    _, port = metrics_worker
    client = Client(Settings(broker_url=imgq_env["IMGQ_BROKER_URL"], models_file=models_file))
    images = sorted(str(p) for p in photos.glob("*.jpg")) * 14  # a chunk of several batches
    before = scrape(port)
    job = client.submit(images, models=[MODEL], chunk_size=len(images))
    job.send_chunk(MODEL, 0)  # the same task again, while the first delivery runs
    job.wait(progress=False, timeout=60)
    n = len(images)

    def ended() -> bool:  # the second delivery either ran too, or was acknowledged unrun
        now = scrape(port)
        ran = value(now, "imgq_worker_images_classified_total", model=MODEL) - value(
            before, "imgq_worker_images_classified_total", model=MODEL
        )
        skipped = value(now, "imgq_worker_tasks_duplicate_total", model=MODEL) - value(
            before, "imgq_worker_tasks_duplicate_total", model=MODEL
        )
        return ran + n * skipped >= 2 * n

    wait_for(ended, 30, "both deliveries to end")
    after = scrape(port)
    redelivered = "imgq_worker_tasks_redelivered_total"
    assert value(after, redelivered, model=MODEL) == value(before, redelivered, model=MODEL)
    assert len(job.results()) == len(images)


def test_warm_up_before_ping(metrics_worker: tuple[WorkerProcess, int]) -> None:
    worker, _ = metrics_worker
    # The fixture returned once the worker answered a ping: warm-up was done by then.
    log = worker.log.read_text()
    line = next(x for x in log.splitlines() if "warmed up" in x)
    assert f"model {MODEL} warmed up: batch sizes [1, 2, 4, 8]" in line
    assert log.index("warmed up") < log.index("ready.")


def test_metrics_off_by_default(shared_worker: WorkerProcess) -> None:
    assert "worker metrics on" not in shared_worker.log.read_text()


def test_port_in_use_stops_the_worker(
    metrics_worker: tuple[WorkerProcess, int],
    start_worker: Callable[..., WorkerProcess],
    models_file: Path,
) -> None:
    _, port = metrics_worker
    env = {"IMGQ_WORKER_METRICS_PORT": str(port), "IMGQ_MODELS_FILE": str(models_file)}
    worker = start_worker(MODEL, name="metrics-clash", wait=False, env=env)
    deadline = time.monotonic() + 120
    while worker.running.poll() is None:
        assert time.monotonic() < deadline, "the worker did not stop"
        time.sleep(0.2)
    assert worker.running.returncode == 2
    assert "IMGQ_WORKER_METRICS_PORT" in worker.log.read_text()


DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana" / "imgq.json"
# Reported only where TensorFlow has a GPU; the CPU test worker has none.
GPU_ONLY = {"imgq_worker_device_memory_bytes"}


def dashboard_metrics() -> set[str]:
    """The metric names the dashboard's queries read."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert exprs
    return {n for e in exprs for n in re.findall(r"\b((?:imgq|flower)_[a-z0-9_]+)", e)}


def exported_names(text: str) -> set[str]:
    """Every sample name in a Prometheus text exposition."""
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_every_dashboard_metric_exists(
    metrics_worker: tuple[WorkerProcess, int], imgq_env: dict[str, str]
) -> None:
    from flower.events import get_prometheus_metrics
    from prometheus_client import CollectorRegistry, generate_latest

    from producer.metrics import QueueCollector
    from shared.celery_app import create_app
    from shared.liveness import BrokerRedis

    _, port = metrics_worker
    names = dashboard_metrics()
    worker = {n for n in names if n.startswith("imgq_worker_")}
    assert worker >= {"imgq_worker_images_classified_total", "imgq_worker_batch_size_sum"}
    # The worker's own, scraped after test_counters_match_the_job ran a job on it.
    scraped = exported_names(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    assert worker - GPU_ONLY <= scraped, sorted(worker - GPU_ONLY - scraped)
    # imgq metrics (queue lengths), on the same Redis.
    registry = CollectorRegistry()
    broker = BrokerRedis(create_app(Settings(broker_url=imgq_env["IMGQ_BROKER_URL"])))
    registry.register(QueueCollector(broker, [MODEL]))
    queues = exported_names(generate_latest(registry).decode())
    imgq = {n for n in names if n.startswith("imgq_") and not n.startswith("imgq_worker_")}
    assert imgq and imgq <= queues, sorted(imgq - queues)
    # Flower's metric families (the ones tests/test_flower.py reads from a real Flower).
    flower_names = {family._name for family in vars(get_prometheus_metrics()).values()}
    flower = {n for n in names if n.startswith("flower_")}
    assert {n.removesuffix("_total") for n in flower} <= flower_names, flower

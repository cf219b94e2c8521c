"""Redis at ``maxmemory`` (``noeviction``): nothing lost, nothing falsely failed; workers
pause and resume by themselves, and a submit into a full Redis is refused cleanly.

One Redis of this module's own (its ``maxmemory`` is changed), with real workers."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from producer.api import Client, RedisFullError
from shared.settings import Settings
from tests.conftest import RedisServer, WorkerProcess, free_port, run_cli, wait_for, wait_ready
from tests.test_faults import make_images
from tests.test_worker_metrics import scrape, value

pytestmark = pytest.mark.slow

# A model no worker of this module serves.
IDLE = "tcustom"

# Short intervals: the pause shows within a heartbeat, a lost message comes back soon.
FAST = {
    "IMGQ_HEARTBEAT_INTERVAL": "0.5",
    "IMGQ_HEARTBEAT_TIMEOUT": "3",
    "IMGQ_SWEEP_GRACE": "3",
    "IMGQ_MAX_BATCH_DELAY_MS": "20",
}


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis whose maxmemory the tests change (noeviction, Redis' default policy)."""
    server = RedisServer(tmp_path_factory.mktemp("full-redis")).start()
    server.client().config_set("maxmemory-policy", "noeviction")
    # Queues uncompressed (Redis's default): the tests size maxmemory's headroom by the
    # task messages' own bytes.
    server.client().config_set("list-compress-depth", 0)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def env(own_redis: RedisServer, imgq_env: dict[str, str]) -> dict[str, str]:
    """The producer's and the workers' environment on that Redis."""
    return {**imgq_env, **FAST, "IMGQ_BROKER_URL": own_redis.url}


@pytest.fixture(scope="module")
def worker(
    start_worker: Callable[..., WorkerProcess], env: dict[str, str]
) -> Iterator[tuple[WorkerProcess, int]]:
    """A worker serving tfault on that Redis, with its /metrics on a free port; stopped
    at the end of the module, before its Redis (it would retry leaving the listing)."""
    port = free_port()
    started = start_worker(
        "tfault",
        name="full-redis",
        env={**env, "IMGQ_WORKER_METRICS_PORT": str(port)},
        args=("--concurrency", "2"),
    )
    started.module_owned = True
    yield started, port
    started.stop()


@pytest.fixture
def unlimited(own_redis: RedisServer) -> Iterator[redis.Redis]:
    """The module's Redis client; its maxmemory is lifted again after the test."""
    r = own_redis.client()
    yield r
    r.config_set("maxmemory", 0)


def client_for(env: dict[str, str]) -> Client:
    return Client(Settings(broker_url=env["IMGQ_BROKER_URL"], models_file=env["IMGQ_MODELS_FILE"]))


def fill(r: redis.Redis) -> None:
    """Redis at maxmemory: every write that could take memory is refused."""
    r.config_set("maxmemory", max(1, int(r.info("memory")["used_memory"]) // 2))
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        r.set("imgq:test:probe", "x")


def test_results_that_do_not_fit_stall_the_job_then_it_finishes(
    worker: tuple[WorkerProcess, int], env: dict[str, str], unlimited: redis.Redis, tmp_path: Path
) -> None:
    proc, port = worker
    images = make_images(tmp_path / "imgs", 24, size=(40, 30))
    client = client_for(env)
    # What each image gets when nothing goes wrong.
    reference = client.submit(images, models=["tfault"], chunk_size=4)
    reference.wait(progress=False, timeout=60)
    expected = {r.image: r.top5[0].label for r in reference.results()}
    before = scrape(port)

    job = client.submit(images, models=["tfault"], chunk_size=2)
    wait_for(lambda: job.status().models["tfault"].done >= 2, 60, "the job to start")
    fill(unlimited)
    wait_for(lambda: "imgq worker paused" in proc.output(), 30, "the worker to pause")
    paused = scrape(port)
    assert value(paused, "imgq_store_unavailable", store="redis") == 1
    time.sleep(2.0)
    status = job.status().models["tfault"]
    assert status.pending > 0 and status.failed == 0  # stalled, nothing falsely failed
    assert proc.running.poll() is None

    unlimited.config_set("maxmemory", 0)
    status = job.wait(progress=False, timeout=90)
    assert status.models["tfault"].as_dict() == {"total": 24, "done": 24, "failed": 0, "pending": 0}
    records = job.results()
    assert Counter(r.image for r in records) == Counter(images)  # each exactly once
    assert {r.image: r.top5[0].label for r in records} == expected
    assert all(r.error is None for r in records)
    out = proc.output()
    assert "imgq worker resumed" in out and "Unrecoverable error" not in out
    assert proc.running.poll() is None
    after = scrape(port)
    assert value(after, "imgq_store_unavailable", store="redis") == 0
    # Results computed while Redis was full were kept, not computed again.
    classified = value(after, "imgq_worker_images_classified_total", model="tfault") - value(
        before, "imgq_worker_images_classified_total", model="tfault"
    )
    assert classified == 24


def test_a_worker_started_against_a_full_redis_waits(
    worker: tuple[WorkerProcess, int],
    start_worker: Callable[..., WorkerProcess],
    env: dict[str, str],
    unlimited: redis.Redis,
    tmp_path: Path,
) -> None:
    fill(unlimited)
    late = start_worker("tsolo", name="full-redis-late", wait=False, env=env)
    wait_for(lambda: "imgq worker paused" in late.output(), 120, "the new worker to pause")
    time.sleep(3.0)  # its consumer tried to connect meanwhile (a write Redis refuses)
    assert late.running.poll() is None, late.output()[-3000:]
    unlimited.config_set("maxmemory", 0)
    wait_ready(late, timeout=60)
    job = client_for(env).submit(make_images(tmp_path / "imgs", 3), models=["tsolo"])
    assert job.wait(progress=False, timeout=60).models["tsolo"].done == 3
    assert "Unrecoverable error" not in late.output()


def test_submit_into_a_full_redis_is_refused_and_leaves_nothing(
    env: dict[str, str], unlimited: redis.Redis, tmp_path: Path
) -> None:
    images = make_images(tmp_path / "imgs", 3)
    fill(unlimited)
    result = run_cli(["submit", *images, "--model", "tfault", "--job-id", "refused-job"], env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "maxmemory" in lines[0] and "PostgreSQL" in lines[0]
    assert unlimited.keys("*refused-job*") == []
    assert not queued_of(unlimited, "refused-job")


def test_submit_that_fills_redis_half_way_withdraws_what_it_sent(
    env: dict[str, str], unlimited: redis.Redis, tmp_path: Path
) -> None:
    """Room for the job record, not for its 2,000 task messages: the tasks sent before
    Redis refused the next one are taken back, and the record goes too. (A model no
    worker here serves: nothing takes those tasks meanwhile.)"""
    image = make_images(tmp_path / "imgs", 1)[0]
    used = int(unlimited.info("memory")["used_memory"])
    unlimited.config_set("maxmemory", used + 1_000_000)
    with pytest.raises(RedisFullError, match="maxmemory"):
        client_for(env).submit([image] * 2000, models=[IDLE], chunk_size=1, job_id="half-job")
    unlimited.config_set("maxmemory", 0)
    assert unlimited.keys("*half-job*") == []
    assert not queued_of(unlimited, "half-job", IDLE)
    assert unlimited.zscore("imgq:jobs", "half-job") is None


def queued_of(r: redis.Redis, job_id: str, model: str = "tfault") -> list[bytes]:
    """The messages of a job waiting in a model's queue (every priority level)."""
    queued = [m for q in r.keys(f"imgq.{model}*") for m in r.lrange(q, 0, -1)]
    return [m for m in queued if json.loads(m)["headers"]["id"].startswith(f"{job_id}.")]


def test_metrics_show_redis_memory_and_its_limit(
    own_redis: RedisServer, unlimited: redis.Redis
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from producer.metrics import QueueCollector
    from shared.celery_app import create_app
    from shared.liveness import BrokerRedis

    unlimited.config_set("maxmemory", 50_000_000)
    registry = CollectorRegistry()
    broker = BrokerRedis(create_app(Settings(broker_url=own_redis.url)))
    registry.register(QueueCollector(broker, ["tfault"]))
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }
    assert samples["imgq_redis_memory_max_bytes"] == 50_000_000
    assert 0 < samples["imgq_redis_memory_used_bytes"] < 50_000_000

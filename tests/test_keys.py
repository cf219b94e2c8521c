"""Every key on the Redis it belongs to: the broker (queues, deliveries, liveness) and
the job store (the result backend's Redis: job records, results) set apart, on
another database and on another server. Real Redis servers, a real worker."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from producer.api import Client
from shared.priority import queue_lists
from shared.settings import Settings
from tests.conftest import (
    ROOT,
    RedisServer,
    WorkerProcess,
    free_port,
    renamed_model_file,
    run_cli,
)
from tests.notify_receiver import Receiver
from tests.queues import waiting

pytestmark = pytest.mark.slow

SERVED = "tkeys"  # this module's worker serves it
UNSERVED = "tkeysq"  # nobody does: its tasks stay queued
# A delivery is handed to another consumer after this long unless kept fresh.
VISIBILITY_S = 10
# How long the slow image takes to arrive: longer than the visibility timeout and
# kombu's look for timed-out deliveries after it (every second here).
SLOW_FETCH_S = 13.0


@pytest.fixture(scope="module")
def other_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second Redis server, for the job store."""
    server = RedisServer(tmp_path_factory.mktemp("redis-jobs")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def broker_url(redis_url: str) -> str:
    """A database of the tests' Redis of this module's own (no other test's worker
    sweeps or recovers there)."""
    url = redis_url.rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def models_file(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys-models")
    path = renamed_model_file(models_dir, folder, SERVED)
    text = path.read_text()
    path.write_text(text + "\n" + text.replace(f"[models.{SERVED}]", f"[models.{UNSERVED}]"))
    return path


@pytest.fixture(scope="module")
def env(
    imgq_env: dict[str, str], broker_url: str, other_server: str, models_file: Path
) -> dict[str, str]:
    """Producers and the worker: the broker and the job store on different servers."""
    return {
        **imgq_env,
        "IMGQ_BROKER_URL": broker_url,
        "IMGQ_RESULT_BACKEND": other_server,
        "IMGQ_MODELS_FILE": str(models_file),
        "IMGQ_VISIBILITY_TIMEOUT": str(VISIBILITY_S),
        "IMGQ_ALLOW_PRIVATE_URLS": "true",
        "IMGQ_FETCH_TIMEOUT": "60",
    }


@pytest.fixture(scope="module")
def worker(start_worker: Callable[..., WorkerProcess], env: dict[str, str]) -> WorkerProcess:
    keys = (
        "IMGQ_BROKER_URL",
        "IMGQ_RESULT_BACKEND",
        "IMGQ_MODELS_FILE",
        "IMGQ_VISIBILITY_TIMEOUT",
        "IMGQ_ALLOW_PRIVATE_URLS",
        "IMGQ_FETCH_TIMEOUT",
    )
    w = start_worker(
        SERVED, name="keys", env={k: env[k] for k in keys}, args=("--concurrency", "2")
    )
    w.module_owned = True
    yield w
    w.stop()


def make_client(env: dict[str, str], backend: str | None = None) -> Client:
    return Client(
        Settings(
            broker_url=env["IMGQ_BROKER_URL"],
            result_backend=backend or env["IMGQ_RESULT_BACKEND"],
            models_file=env["IMGQ_MODELS_FILE"],
            visibility_timeout=VISIBILITY_S,
            allow_private_urls=True,
        )
    )


def images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"k{i}.jpg"
        Image.new("RGB", (40, 30), (i * 40 % 256, 90, 160)).save(path)
        paths.append(str(path))
    return paths


def scrape_queue_length(env: dict[str, str]) -> str:
    """``imgq metrics`` as an operator runs it; the sample of the unserved model's queue."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "metrics", "--port", str(port), "-m", UNSERVED],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    return next(line for line in text.splitlines() if line.startswith("imgq_queue_length{"))


@pytest.mark.parametrize("apart", ["database", "server"])
def test_cancel_and_metrics_find_the_queues_on_the_broker(
    apart: str, env: dict[str, str], other_server: str, redis_url: str, tmp_path: Path
) -> None:
    backend = redis_url.rsplit("/", 1)[0] + "/13" if apart == "database" else other_server
    env = {**env, "IMGQ_RESULT_BACKEND": backend}
    client = make_client(env, backend)
    job = client.submit(images(tmp_path, 3), models=[UNSERVED], chunk_size=1)
    queue = f"imgq.{UNSERVED}"
    broker = redis.Redis.from_url(env["IMGQ_BROKER_URL"])
    assert waiting(broker, queue) == 3
    try:
        assert scrape_queue_length(env).endswith(" 3.0")
        cancelled = run_cli(["cancel", job.job_id], env, timeout=60)
        assert cancelled.returncode == 0, cancelled.stderr
        assert waiting(broker, queue) == 0
        assert job.status().cancelled
    finally:
        broker.delete(*queue_lists(queue))


class SlowImage(BaseHTTPRequestHandler):
    """Serves one small JPEG after SLOW_FETCH_S seconds; counts the requests."""

    requests = 0
    body = b""

    def do_GET(self) -> None:
        type(self).requests += 1
        time.sleep(SLOW_FETCH_S)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_task_longer_than_the_visibility_timeout_runs_once(
    worker: WorkerProcess, env: dict[str, str]
) -> None:
    """The heartbeat keeps its own deliveries fresh in ``unacked_index``, so kombu's
    visibility-timeout restore does not hand a long task of a live worker to another."""
    jpeg = BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(jpeg, format="JPEG")
    SlowImage.body, SlowImage.requests = jpeg.getvalue(), 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = make_client(env)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/slow.jpg"
        start = time.monotonic()
        job = client.submit([url], models=[SERVED], chunk_size=1)
        status = job.wait(progress=False, timeout=90)
        assert time.monotonic() - start > VISIBILITY_S + 1  # it did outlast the timeout
        assert status.models[SERVED].done == 1
        time.sleep(1)  # a second delivery would have fetched again by now
        assert SlowImage.requests == 1
        log = worker.log.read_text(errors="replace")
        assert log.count(f"imgq.classify[{job.job_id}.{SERVED}.000000] received") == 1
    finally:
        server.shutdown()


def test_a_deleted_job_leaves_no_key_naming_it(
    worker: WorkerProcess, env: dict[str, str], other_server: str, tmp_path: Path
) -> None:
    client = make_client(env)
    receiver = Receiver().start()
    try:
        job = client.submit(
            images(tmp_path, 5), models=[SERVED], chunk_size=2, notify=receiver.url("/done")
        )
        job.wait(progress=False, timeout=120)
        receiver.wait_for("/done", 1)  # the completion callback was claimed, and sent
    finally:
        receiver.stop()
    databases = [
        redis.Redis.from_url(env["IMGQ_BROKER_URL"]),
        redis.Redis.from_url(other_server),
    ]

    def naming() -> list[bytes]:
        return [k for r in databases for k in r.scan_iter(match=f"*{job.job_id}*", count=1000)]

    assert naming()  # records, results, the callback's claim
    deleted = run_cli(["delete", job.job_id, "--yes"], env, timeout=60)
    assert deleted.returncode == 0, deleted.stderr
    assert naming() == []
    for r in databases:
        assert r.zscore("imgq:jobs", job.job_id) is None
        assert r.zscore("imgq:jobs:open", job.job_id) is None

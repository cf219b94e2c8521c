"""Scaling on real parts: several worker processes on one model's queue, per-model
queues, and workers joining and leaving in the middle of a job.

The models here (``tscale_a``, ``tscale_b``) are served by no session worker, so
the work is only the workers these tests start. Images come from a local HTTP
server that answers after a set delay: a task's length is then a sleep, not CPU
the two cores need to start workers, and a test can slow a job down to keep it
running while workers come and go.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.api import Client, Job
from shared.settings import Settings
from tests.conftest import WorkerProcess, model_lines, wait_ready
from tests.queues import waiting

pytestmark = pytest.mark.slow

A, B = "tscale_a", "tscale_b"
WORKER_ARGS = ("--concurrency", "2")
SUCCEEDED = re.compile(r"Task imgq\.classify\[([^\]]+)\] succeeded")
RECEIVED = re.compile(r"Task imgq\.classify\[([^\]]+)\] received")


class SlowImages:
    """Serves the test photos at ``/<n>/<name>.jpg`` after ``delay`` seconds."""

    def __init__(self, photos: Path) -> None:
        self.photos = sorted(photos.glob("*.jpg"))
        self.delay = 0.0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(owner.delay)
                path = owner.photos[0].parent / self.path.rsplit("/", 1)[-1]
                if path not in owner.photos:
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def urls(self, n: int, tag: str) -> list[str]:
        """``n`` distinct image URLs (the same photos under different paths)."""
        port = self.server.server_address[1]
        return [
            f"http://127.0.0.1:{port}/{tag}-{i:04d}/{self.photos[i % len(self.photos)].name}"
            for i in range(n)
        ]


@pytest.fixture(scope="module")
def images(photos: Path) -> Iterator[SlowImages]:
    served = SlowImages(photos)
    yield served
    served.server.shutdown()
    served.server.server_close()


@pytest.fixture(scope="module")
def scale_env(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two models no session worker serves (numpy runtime), in their own models file;
    URLs allowed."""
    toml = tmp_path_factory.mktemp("scale") / "models.toml"
    lines = [f"[models.{A}]", *model_lines(models_dir, "tsolo"), ""]
    lines += [f"[models.{B}]", *model_lines(models_dir, "tfault"), ""]
    toml.write_text("\n".join(lines), encoding="utf-8")
    # The test server is on loopback, which workers refuse unless told otherwise.
    return {"IMGQ_MODELS_FILE": str(toml), "IMGQ_ALLOW_PRIVATE_URLS": "true"}


@pytest.fixture(scope="module")
def scale_client(redis_url: str, scale_env: dict[str, str]) -> Client:
    """A producer that knows the scaling models (a Client built from explicit settings)."""
    return Client(Settings(broker_url=redis_url, models_file=Path(scale_env["IMGQ_MODELS_FILE"])))


@pytest.fixture(scope="module")
def scale_workers(
    start_worker: Callable[..., WorkerProcess], scale_env: dict[str, str]
) -> Iterator[Callable[..., list[WorkerProcess]]]:
    """Start named workers of one model (all at once: their startups overlap); each
    name once per module. Every one is stopped at the end of the module."""
    started: dict[str, WorkerProcess] = {}

    def start(model: str, *names: str) -> list[WorkerProcess]:
        new = [n for n in names if n not in started]
        for name in new:
            started[name] = start_worker(
                model, name=name, wait=False, env=scale_env, args=WORKER_ARGS
            )
            started[name].module_owned = True  # shared by this module's tests
        for name in new:
            wait_ready(started[name])
        return [started[n] for n in names]

    yield start
    running = [w for w in started.values() if w.proc.poll() is None]
    for worker in running:  # all at once: their warm shutdowns overlap
        worker.proc.send_signal(signal.SIGTERM)
    for worker in running:
        try:
            worker.proc.wait(30)
        except subprocess.TimeoutExpired:
            worker.stop(signal.SIGKILL)


def task_runs(worker: WorkerProcess, pattern: re.Pattern[str] = SUCCEEDED) -> Counter[str]:
    """Task ids in the worker's log (succeeded, or another line pattern), with counts."""
    return Counter(pattern.findall(worker.output()))


def assert_once_each(job: Job, expected: list[str], model: str) -> None:
    """One result per image, all classified."""
    records = job.results()
    assert Counter((r.image, r.model) for r in records) == Counter((i, model) for i in expected)
    errors = [(r.image, r.error) for r in records if r.error]
    assert not errors, errors[:5]


def poll(what: str, fn: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not true after {timeout} s")


def test_workers_share_one_job(
    scale_workers: Callable[..., list[WorkerProcess]],
    scale_client: Client,
    images: SlowImages,
) -> None:
    workers = scale_workers(A, "scale-a1", "scale-a2")
    images.delay = 0.05
    urls = images.urls(48, "share")
    job = scale_client.submit(urls, models=[A], chunk_size=2)
    assert job.wait(progress=False, timeout=90).finished
    assert_once_each(job, urls, A)

    ids = job.record.task_ids(A)
    assert len(ids) == 24
    runs = [Counter({t: c for t, c in task_runs(w).items() if t in ids}) for w in workers]
    # Every task ran exactly once, and both workers took a share.
    assert sum(runs, Counter()) == Counter(ids)
    assert all(runs), [len(r) for r in runs]


def test_worker_gets_only_its_models_tasks(
    scale_workers: Callable[..., list[WorkerProcess]],
    scale_client: Client,
    photos: Path,
    redis_url: str,
) -> None:
    a_workers = scale_workers(A, "scale-a1", "scale-a2")
    job = scale_client.submit([str(photos)], models=[A, B], chunk_size=1)
    b_ids = set(job.record.task_ids(B))
    poll(f"{A} done", lambda: job.status().models[A].pending == 0)
    # A's workers are idle now; B's tasks still wait in B's queue, untouched.
    time.sleep(1.0)
    status = job.status()
    assert not status.finished and status.models[B].done == 0
    assert waiting(redis.Redis.from_url(redis_url), f"imgq.{B}") == len(b_ids) == 3
    for w in a_workers:
        assert not b_ids & set(task_runs(w, RECEIVED)), w.name

    (b_worker,) = scale_workers(B, "scale-b1")
    assert job.wait(progress=False, timeout=60).finished
    assert set(task_runs(b_worker)) >= b_ids
    assert not set(job.record.task_ids(A)) & set(task_runs(b_worker, RECEIVED))
    for w in a_workers:
        assert not b_ids & set(task_runs(w, RECEIVED)), w.name
    assert len(job.results()) == 6


def test_workers_join_and_leave_mid_job(
    scale_workers: Callable[..., list[WorkerProcess]],
    scale_client: Client,
    images: SlowImages,
) -> None:
    (first,) = scale_workers(B, "scale-b1")
    # Slow images keep the job running while the second worker starts (its
    # startup time does not matter); fast ones finish it once the first left.
    images.delay = 0.5
    urls = images.urls(160, "join")
    job = scale_client.submit(urls, models=[B], chunk_size=1)
    ids = set(job.record.task_ids(B))

    def done_by(w: WorkerProcess) -> set[str]:
        return ids & set(task_runs(w))

    (second,) = scale_workers(B, "scale-b2")
    assert job.status().models[B].pending > 0, "the job finished before the second worker joined"
    poll("the second worker takes tasks of the job", lambda: done_by(second))

    # Warm shutdown: the first finishes the tasks it runs and gives back what it took.
    assert first.stop(signal.SIGTERM) == 0, first.output()[-3000:]
    assert "Warm shutdown" in first.output()
    assert job.status().models[B].pending > 0, "the job finished before the first worker left"
    images.delay = 0.0
    assert job.wait(progress=False, timeout=90).finished
    assert_once_each(job, urls, B)

    runs = [Counter({t: c for t, c in task_runs(w).items() if t in ids}) for w in (first, second)]
    assert sum(runs, Counter()) == Counter(ids), "a task ran twice or not at all"
    assert all(runs)

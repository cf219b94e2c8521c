"""Job control on real workers: cancel a big job, an urgent job overtakes a big one,
``imgq wait`` re-attaches after the submitter was killed, and a cancelled job's
task that still reaches a worker is dropped before anything is read."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.api import Client
from shared.jobs import task_id
from shared.registry import load_registry, queue_for
from shared.settings import Settings
from tests.conftest import ROOT, WorkerProcess, renamed_model_file, run_cli, wait_for
from tests.queues import waiting
from workers.batcher import DynamicBatcher, Skipped
from workers.classifier import Classifier

pytestmark = pytest.mark.slow

MODEL = "tjobctl"
BIG = 5000
# Each task is one batch that waits 250 ms for images that never come (4-image
# chunks, batches of 8, one task at a time): a slow model that costs no CPU.
SLOW = {"IMGQ_MAX_BATCH_DELAY_MS": "250"}


@pytest.fixture(scope="module")
def models_file(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models file with a model of this module's own (its own queue)."""
    return renamed_model_file(models_dir, tmp_path_factory.mktemp("jobctl-models"), MODEL, "tsolo")


@pytest.fixture(scope="module")
def env(imgq_env: dict[str, str], models_file: Path) -> dict[str, str]:
    return {**imgq_env, "IMGQ_MODELS_FILE": str(models_file)}


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """5,000 small JPEGs."""
    folder = tmp_path_factory.mktemp("jobctl-images")
    paths = []
    for i in range(BIG):
        path = folder / f"img{i:04d}.jpg"
        Image.new("RGB", (24, 24), (i % 251, (7 * i) % 251, 90)).save(path, quality=80)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def worker(start_worker: Callable[..., WorkerProcess], env: dict[str, str]) -> WorkerProcess:
    """One worker, one task at a time."""
    return start_worker(
        MODEL,
        name="jobctl",
        env={**SLOW, "IMGQ_MODELS_FILE": env["IMGQ_MODELS_FILE"]},
        args=("--concurrency", "1"),
    )


@pytest.fixture
def client(env: dict[str, str]) -> Client:
    return Client(
        Settings(
            broker_url=env["IMGQ_BROKER_URL"], models_file=env["IMGQ_MODELS_FILE"], chunk_size=4
        )
    )


def tasks_finished(client: Client, job_id: str) -> int:
    return len(client.store.finished_tasks(job_id))


def test_urgent_job_overtakes_a_big_one(
    worker: WorkerProcess, client: Client, many: list[str]
) -> None:
    big = client.submit(many, models=[MODEL], name="big backfill")
    wait_for(lambda: tasks_finished(client, big.job_id) >= 2, 120, "the big job to start")
    before = big.status().images_finished
    urgent = client.submit(many[:64], models=[MODEL], priority=9, name="urgent")
    status = urgent.wait(progress=False, timeout=180)
    during = big.status().images_finished - before
    assert status.finished and status.images_finished == 64
    # The bound is 10% of the big job; with one task at a time the worker
    # finishes the task it holds and then takes only urgent tasks.
    assert during < BIG // 10
    assert during <= 2 * 4, f"{during} images of the big job ran while the urgent one waited"
    assert big.cancel().removed_tasks > 1000


def test_cancel_a_big_job_on_a_slow_model(
    worker: WorkerProcess, client: Client, env: dict[str, str], many: list[str]
) -> None:
    big = client.submit(many, models=[MODEL], name="wrong folder")
    wait_for(lambda: tasks_finished(client, big.job_id) >= 3, 120, "the big job to start")
    result = run_cli(["cancel", big.job_id], env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"cancelled job {big.job_id}:" in result.stdout
    at_cancel = tasks_finished(client, big.job_id)
    # Every waiting task of the job left the queue.
    assert waiting(client.store.client, queue_for(MODEL)) == 0
    # About 20 tasks' time: the worker finishes at most the batch it had.
    time.sleep(5)
    after = tasks_finished(client, big.job_id)
    assert after - at_cancel <= 1, f"{after - at_cancel} tasks of the cancelled job ran after"
    status = big.status()
    assert status.cancelled and not status.finished
    assert status.images_total - status.images_finished > BIG * 0.9  # never classified
    # A job submitted afterwards is served next: nothing of the old job is left to drop.
    fresh = client.submit(many[:8], models=[MODEL], name="next")
    assert fresh.wait(progress=False, timeout=120).finished
    assert worker.output().count(f"job {big.job_id} is cancelled") <= 1
    # The cancelled job's results list what was done, once each.
    records = big.results()
    assert len(records) == status.images_finished
    assert len({r.image for r in records}) == len(records)
    listed = json.loads(run_cli(["jobs", "--json", "--limit", "5"], env, timeout=60).stdout)
    states = {row["job_id"]: row["state"] for row in listed}
    assert states[big.job_id] == "cancelled" and states[fresh.job_id] == "finished"


def test_a_cancelled_jobs_task_is_dropped_before_reading(
    worker: WorkerProcess, client: Client, tmp_path: Path
) -> None:
    # A message of the job that was not on the queue at the cancel (a resend
    # racing it) still reaches a worker: dropped, not read (the file does not
    # exist, so reading it would make a not_found record).
    from producer.api import Job
    from shared.schemas import ImageRef

    missing = [ImageRef(src="gone.jpg", ref=str(tmp_path / "gone.jpg"))]
    # The job is recorded without sending its task (a submit would send it, and the
    # idle worker could start it before the cancel: it would then run, rightly).
    record = client.store.create("jobctl-dropped", [MODEL], [missing], chunk_size=1)
    job = Job(client, record)
    job.cancel()
    job.send_chunk(MODEL, 0)
    tid = task_id(job.job_id, MODEL, 0)
    result = client.app.AsyncResult(tid)
    wait_for(lambda: result.state == "REVOKED", 60, "the task to be revoked")
    assert f"job {job.job_id} is cancelled: task {tid} dropped" in worker.output()
    assert tasks_finished(client, job.job_id) == 0
    assert job.results() == []


def test_wait_reattaches_after_the_submitter_was_killed(
    worker: WorkerProcess, client: Client, env: dict[str, str], many: list[str], tmp_path: Path
) -> None:
    images = many[100:164]
    job_id = "jobctl-reattach"
    submitter = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "submit", *images, "--model", MODEL,
         "--job-id", job_id, "--chunk-size", "4", "--wait", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(
            lambda: client.store.client.exists(f"imgq:job:{job_id}:done") == 1, 120, "progress"
        )
    finally:
        submitter.send_signal(signal.SIGKILL)
        submitter.wait(30)
    assert not client.job(job_id).status().finished
    out = tmp_path / "results.jsonl"
    result = run_cli(["wait", job_id, "--out", str(out), "--no-progress"], env, timeout=240)
    assert result.returncode == 0, result.stderr
    assert f"job {job_id}: finished, 64 images" in result.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    counts = Counter(r["image"] for r in records)
    assert set(counts) == set(images) and max(counts.values()) == 1
    assert all(r["error"] is None for r in records)


def test_batcher_drops_images_whose_job_was_cancelled(models_dir: Path) -> None:
    spec = load_registry(models_dir / "models.toml")["t1001"]
    classifier = Classifier(spec, max_batch_size=8).load()
    batcher = DynamicBatcher(classifier, max_delay=0.3)
    data = np.random.default_rng(5).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    try:
        cancelled = batcher.submit(list(data[:2]), skip=lambda: True)
        kept = batcher.submit(list(data[2:]), skip=lambda: False)
        for future in cancelled:
            with pytest.raises(Skipped):
                future.result(30)
        assert [f.result(30) for f in kept]
    finally:
        batcher.close()
    assert batcher.images == 2  # the model saw only the images of the job that goes on

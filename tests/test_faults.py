"""Nothing lost: faults on real processes. Workers killed mid-job, Redis restarted
(mid-job, and under a batch waiting for more images), duplicate deliveries, an input
that kills the process, graceful shutdown, and a pickled message. Each ends with
every image exactly once per model.

The store is the subject of two of them, which run on both results stores: a worker
killed mid-job (writes cut off halfway) and a duplicate delivery (counted and stored
once). The others run on one store each, the one whose path they stress most."""

from __future__ import annotations

import pickle
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.api import Client
from shared.priority import queue_lists
from shared.settings import Settings
from tests.conftest import RedisServer, WorkerProcess, wait_for, wait_ready
from tests.pg import row_count

pytestmark = pytest.mark.slow

# Short enough that a dead worker's tasks come back within seconds.
# A worker killed between taking a message off its queue and recording it as taken
# loses it; the sweep sends it again once the job has stalled for IMGQ_SWEEP_GRACE
# (60 s by default, which such a test would spend waiting).
FAST_REDELIVERY = {"IMGQ_VISIBILITY_TIMEOUT": "10", "IMGQ_SWEEP_GRACE": "5"}
# Each batch waits 250 ms for images that never come: a job lasts long enough to
# be interrupted, without burning the CPU.
SLOW = {"IMGQ_MAX_BATCH_DELAY_MS": "250"}


def fast_redelivery_client(imgq_env: dict[str, str], results_url: str = "redis") -> Client:
    """A producer that, like the workers here, counts on a 10 s visibility timeout."""
    return Client(
        Settings(
            broker_url=imgq_env["IMGQ_BROKER_URL"],
            models_file=imgq_env["IMGQ_MODELS_FILE"],
            visibility_timeout=10,
            results_url=results_url,
        )
    )


def sfx(results_url: str) -> str:
    """A worker-name suffix per store: worker logs are kept per name, appended to."""
    return "" if results_url == "redis" else "-pg"


def store_client(imgq_env: dict[str, str], results_url: str, **settings: Any) -> Client:
    """A producer reading results from ``results_url``'s store."""
    return Client(
        Settings(
            broker_url=imgq_env["IMGQ_BROKER_URL"],
            models_file=imgq_env["IMGQ_MODELS_FILE"],
            results_url=results_url,
            **settings,
        )
    )


def make_images(folder: Path, n: int, *, size: tuple[int, int] = (320, 240)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:04d}.jpg"
        Image.new("RGB", size, (i % 200, (5 * i) % 200, 60)).save(path, quality=85)
        paths.append(str(path))
    return paths


def assert_exactly_once(
    records: list[Any], images: list[str], models: list[str], job: Any = None
) -> None:
    counts = Counter((r.image, r.model) for r in records)
    assert set(counts) == {(i, m) for i in images for m in models}
    assert max(counts.values()) == 1
    url = job.client.settings.results_url if job is not None else "redis"
    if url != "redis":  # the table itself holds one row per image and model
        assert row_count(url, job.job_id) == len(images) * len(models)


def succeeded(worker: WorkerProcess) -> int:
    return worker.output().count("succeeded in")


def test_worker_killed_mid_job_its_tasks_go_to_another(
    start_worker: Callable[..., WorkerProcess],
    imgq_env: dict[str, str],
    tmp_path: Path,
    results_url: str,
) -> None:
    # The producer knows the visibility timeout too: it resends a task lost on the way.
    client = fast_redelivery_client(imgq_env, results_url)
    images = make_images(tmp_path / "imgs", 240)
    env = {**FAST_REDELIVERY, **SLOW, "IMGQ_RESULTS_URL": results_url}
    a = start_worker(
        "tfault", name=f"kill-a{sfx(results_url)}", env=env, args=("--concurrency", "2")
    )
    b = start_worker(
        "tfault", name=f"kill-b{sfx(results_url)}", env=env, args=("--concurrency", "2")
    )
    job = client.submit(images, models=["tfault"], chunk_size=2)
    kills = 0
    for _ in range(3):
        # Kill A while it has work in hand, then bring it back (a supervisor would).
        wait_for(
            lambda a=a: succeeded(a) >= 3 or job.status().finished,  # type: ignore[misc]
            120,
            f"worker A to get going: {job.status().models}",
        )
        if job.status().finished:
            break
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(30)
        kills += 1
        if job.status().finished:
            break
        a = start_worker(
            "tfault", name=f"kill-a{kills}{sfx(results_url)}", env=env, args=("--concurrency", "2")
        )
    b.stop()  # the rest of the job, redelivered tasks included, goes to the last A
    status = job.wait(progress=False, timeout=240)
    assert kills >= 2
    assert status.models["tfault"].as_dict() == {
        "total": 240,
        "done": 240,
        "failed": 0,
        "pending": 0,
    }
    records = job.results()
    assert_exactly_once(records, images, ["tfault"], job)
    assert all(r.error is None for r in records)
    assert succeeded(b) > 0
    a.stop()


# Redis: the results themselves live in the Redis that restarts (append-only file).
@pytest.mark.parametrize("results_url", ["redis"], indirect=True)
def test_redis_restart_mid_job(
    imgq_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    results_url: str,
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        env = {
            "IMGQ_BROKER_URL": server.url,
            "IMGQ_RESULTS_URL": results_url,
            **FAST_REDELIVERY,
            **SLOW,
        }
        worker = start_worker(
            "tfault", name=f"restart{sfx(results_url)}", env=env, args=("--concurrency", "2")
        )
        images = make_images(tmp_path / "imgs", 200)
        client = store_client({**imgq_env, "IMGQ_BROKER_URL": server.url}, results_url)
        job = client.submit(images, models=["tfault"], chunk_size=2)
        wait_for(lambda: succeeded(worker) >= 5, 120, "the job to start")
        server.stop()  # SIGTERM: Redis writes its append-only file and exits
        time.sleep(1.0)
        server.start()  # same port, same data directory
        status = job.wait(progress=False, timeout=300)
        assert status.finished
        records = job.results()
        assert_exactly_once(records, images, ["tfault"], job)
        assert all(r.error is None for r in records)
        assert worker.proc.poll() is None, "the worker must survive the restart"
        worker.stop()
    finally:
        server.stop()


def test_redis_restart_while_a_batch_waits(
    imgq_env: dict[str, str], start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """A worker filling a batch holds its tasks unacknowledged, a BRPOP pending for
    more. Celery's handling of the lost connection detaches the transport before it
    closes the channel, and restoring (then acknowledging) those deliveries raised
    AttributeError: the worker exited ("Unrecoverable error"). It must reconnect."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        env = {
            "IMGQ_BROKER_URL": server.url,
            **FAST_REDELIVERY,
            # The batch of 2 waits for more images long enough to lose Redis under it.
            "IMGQ_MAX_BATCH_DELAY_MS": "6000",
        }
        worker = start_worker("tfault", name="batchwait", env=env)
        client = store_client({**imgq_env, "IMGQ_BROKER_URL": server.url}, "redis")
        images = make_images(tmp_path / "imgs", 2, size=(64, 48))
        job = client.submit(images, models=["tfault"], chunk_size=1)
        wait_for(lambda: worker.output().count("] received") == 2, 60, "both tasks held")
        server.stop()  # SIGTERM: the append-only file is written, connections drop
        time.sleep(0.5)
        server.start()
        status = job.wait(progress=False, timeout=120)
        assert status.models["tfault"].as_dict() == {
            "total": 2,
            "done": 2,
            "failed": 0,
            "pending": 0,
        }
        assert_exactly_once(job.results(), images, ["tfault"], job)
        assert "Unrecoverable error" not in worker.output()
        assert worker.proc.poll() is None, "the worker must reconnect"
        # It consumes on its new connection.
        after = client.submit(images[:1], models=["tfault"], chunk_size=1)
        assert after.wait(progress=False, timeout=60).finished
        assert worker.stop() == 0
    finally:
        server.stop()


def test_duplicate_delivery_counts_once(
    request: pytest.FixtureRequest,
    imgq_env: dict[str, str],
    photos: Path,
    results_url: str,
) -> None:
    if results_url == "redis":
        model, worker = "t1001", request.getfixturevalue("shared_worker")
    else:  # a worker of its own, writing to PostgreSQL
        model = "tfault"
        worker = request.getfixturevalue("start_worker")(
            model, name="dup-pg", env={"IMGQ_RESULTS_URL": results_url}
        )
    client = store_client(imgq_env, results_url)
    sources = sorted(str(p) for p in photos.glob("*.jpg"))
    job = client.submit(sources, models=[model], chunk_size=2)
    job.wait(progress=False, timeout=120)
    before = job.status().models[model].as_dict()
    # The same tasks delivered again (a redelivery after a slow batch, a resume):
    for index in range(job.record.n_chunks):
        job.send_chunk(model, index)
    time.sleep(0.5)
    wait_for(
        lambda: worker.output().count(job.job_id) >= 4 * job.record.n_chunks,
        60,
        "the duplicates to run",
    )
    assert (
        job.status().models[model].as_dict()
        == before
        == {"total": 3, "done": 3, "failed": 0, "pending": 0}
    )
    assert_exactly_once(job.results(), sources, [model], job)
    if results_url != "redis":
        worker.stop()


# Redis: the crash-loop bookkeeping and the ``worker_crashed`` record share the job's Redis;
# PostgreSQL's error rows: test_pgstore's test_a_chunk_that_fails_for_good_gets_task_failed_rows.
@pytest.mark.parametrize("results_url", ["redis"], indirect=True)
def test_input_that_kills_the_process_is_isolated_and_skipped(
    start_worker: Callable[..., WorkerProcess],
    imgq_env: dict[str, str],
    tmp_path: Path,
    results_url: str,
) -> None:
    client = store_client(imgq_env, results_url)
    images = make_images(tmp_path / "imgs", 6)
    white = tmp_path / "imgs" / "white.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(white)
    sources = [*images[:3], str(white), *images[3:]]
    job = client.submit(sources, models=["tabort"], chunk_size=8)
    crashes = 0
    # A supervisor restarts the worker each time the poison input kills it.
    while not job.status().finished:
        # Not waiting for a ping: the worker may die on its first task before it answers.
        worker = start_worker(
            "tabort",
            name=f"abort-{crashes}{sfx(results_url)}",
            env={**FAST_REDELIVERY, "IMGQ_RESULTS_URL": results_url},
            wait=False,
        )
        deadline = time.monotonic() + 120
        while worker.proc.poll() is None and not job.status().finished:
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.2)
        if worker.proc.poll() is not None:
            crashes += 1
            assert "poison" in worker.output()
        else:
            worker.stop()
        assert crashes <= 4, "the crash loop must be bounded"
    assert crashes == 3  # once in a batch, twice alone; then it is skipped
    assert_exactly_once(job.results(), sources, ["tabort"], job)
    records = {r.image: r for r in job.results()}
    assert records[str(white)].error is not None
    assert records[str(white)].error.code.value == "worker_crashed"
    assert all(records[s].error is None for s in images)


# PostgreSQL: the batch that finishes during the warm shutdown is written over a
# connection that closes with the worker.
@pytest.mark.parametrize("results_url", ["postgresql"], indirect=True)
def test_sigterm_finishes_the_current_batch_and_loses_nothing(
    start_worker: Callable[..., WorkerProcess],
    imgq_env: dict[str, str],
    tmp_path: Path,
    results_url: str,
) -> None:
    client = store_client(imgq_env, results_url)
    images = make_images(tmp_path / "imgs", 160)
    env = {**SLOW, "IMGQ_RESULTS_URL": results_url}
    a = start_worker(
        "tfault", name=f"term-a{sfx(results_url)}", env=env, args=("--concurrency", "2")
    )
    job = client.submit(images, models=["tfault"], chunk_size=4)
    wait_for(lambda: succeeded(a) >= 2, 120, "worker A to get going")
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(60) == 0  # warm shutdown: the running tasks finish first
    b = start_worker(
        "tfault", name=f"term-b{sfx(results_url)}", env=env, args=("--concurrency", "2")
    )
    job.wait(progress=False, timeout=240)
    records = job.results()
    assert_exactly_once(records, images, ["tfault"], job)
    assert all(r.error is None for r in records)
    # Nothing done twice: every task succeeded once, on one worker or the other.
    assert succeeded(a) + succeeded(b) == job.record.n_chunks
    assert "Warm shutdown" in a.output()
    b.stop()


def test_pickled_message_is_rejected_not_run(
    start_worker: Callable[..., WorkerProcess],
    imgq_env: dict[str, str],
    models_dir: Path,
    tmp_path: Path,
) -> None:
    # A queue of its own, served by this test's worker alone: behind another test's
    # backlog, or taken by another worker, the message would not reach this worker.
    from tests.conftest import renamed_model_file

    models = renamed_model_file(models_dir, tmp_path, "tpickle")
    worker = start_worker("tpickle", name="pickled", env={"IMGQ_MODELS_FILE": str(models)})
    client = Client(Settings(broker_url=imgq_env["IMGQ_BROKER_URL"], models_file=models))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    def classify_one(folder: str) -> None:
        job = client.submit([str(p) for p in make_images(tmp_path / folder, 1)], models=["tpickle"])
        job.wait(progress=False, timeout=60)
        assert job.results()[0].error is None

    # A first job declares the queue's route as producers do (the exchange the
    # message below is published to).
    classify_one("first")
    payload = pickle.dumps(((Exploit(),), {}, {}))
    with client.app.producer_or_acquire() as producer:
        producer.publish(
            payload,
            routing_key="imgq.tpickle",
            exchange="imgq.tpickle",
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"task": "imgq.classify", "id": "pickled-1", "lang": "py"},
            declare=[],
        )
    wait_for(
        lambda: "pickled-1" in worker.output() or "untrusted" in worker.output(),
        60,
        "the worker to see the message",
    )
    time.sleep(0.5)
    assert not marker.exists()
    assert worker.proc.poll() is None
    assert "untrusted content" in worker.output().lower() or "refusing" in (worker.output().lower())
    # The worker still works.
    classify_one("after")


def test_url_to_loopback_is_refused_by_default(
    shared_worker: WorkerProcess, client: Client
) -> None:
    job = client.submit(
        ["http://127.0.0.1:9/cat.jpg", "http://169.254.169.254/latest/x.jpg"], models=["t1001"]
    )
    job.wait(progress=False, timeout=60)
    codes = {r.image: r.error.code.value for r in job.results() if r.error}
    assert codes == {
        "http://127.0.0.1:9/cat.jpg": "url_refused",
        "http://169.254.169.254/latest/x.jpg": "url_refused",
    }


def test_allowed_roots_hold_in_the_worker(
    start_worker: Callable[..., WorkerProcess], client: Client, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    inside = make_images(root, 1)
    outside = make_images(tmp_path / "elsewhere", 1)
    (root / "escape.jpg").symlink_to(outside[0])
    ready = tmp_path / "ready" / "worker"
    env = {"IMGQ_ALLOWED_ROOTS": str(root), "IMGQ_READY_FILE": str(ready)}
    worker = start_worker("tfault", name="roots", env=env)
    assert ready.read_text().strip() == str(worker.running.pid)  # the startup probe's file
    sources = [
        inside[0],
        outside[0],
        str(root / "escape.jpg"),
        str(root / ".." / "elsewhere" / "img0000.jpg"),
    ]
    job = client.submit(sources, models=["tfault"])
    job.wait(progress=False, timeout=60)
    codes = {r.image: (r.error.code.value if r.error else None) for r in job.results()}
    assert codes == {
        sources[0]: None,
        sources[1]: "outside_allowed_roots",
        sources[2]: "outside_allowed_roots",
        sources[3]: "outside_allowed_roots",
    }
    worker.stop()
    assert not ready.exists()


def test_wait_ready_helper_reports_a_dead_worker(
    start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = start_worker("nope", name="nope", wait=False)
    with pytest.raises(RuntimeError, match="worker exited"):
        wait_ready(worker, timeout=120)


def test_fuzzed_files_never_hurt_a_worker(
    shared_worker: WorkerProcess, client: Client, tmp_path: Path
) -> None:
    from shared.schemas import ErrorCode
    from tests.corpus import mutated_images

    folder = tmp_path / "fuzz"
    folder.mkdir()
    sources = []
    for i, data in enumerate(mutated_images(240, seed=7)):
        path = folder / f"m{i:03d}.{('jpg', 'png', 'gif')[i % 3]}"
        path.write_bytes(data)
        sources.append(str(path))
    job = client.submit(sources, models=["t1001"], chunk_size=16)
    job.wait(progress=False, timeout=180)
    records = job.results()
    assert_exactly_once(records, sources, ["t1001"])
    codes = Counter(r.error.code.value if r.error else "ok" for r in records)
    assert codes["ok"] > 0 and len(codes) >= 3, codes
    assert set(codes) - {"ok"} <= {c.value for c in ErrorCode}
    assert shared_worker.proc.poll() is None


def test_a_waiting_producer_sends_no_queued_task_again(
    imgq_env: dict[str, str], models_dir: Path, tmp_path: Path
) -> None:
    """Tasks waiting in a queue (behind other work, at a low priority) are not lost: a
    producer that waits for them longer than the visibility timeout plus 10 s (when
    earlier versions sent every unfinished task again) sends none. Tasks lost on the
    way are the sweep's (tests/test_liveness.py)."""
    from producer.api import JobTimeout
    from tests.conftest import renamed_model_file
    from tests.queues import waiting

    models = renamed_model_file(models_dir, tmp_path, "tqueued")  # served by no worker
    client = Client(
        Settings(broker_url=imgq_env["IMGQ_BROKER_URL"], models_file=models, visibility_timeout=10)
    )
    job = client.submit(make_images(tmp_path / "imgs", 2), models=["tqueued"], chunk_size=1)
    try:
        with pytest.raises(JobTimeout):
            job.wait(progress=False, timeout=21)
        assert waiting(client.store.client, "imgq.tqueued") == 2
    finally:
        client.store.client.delete(*queue_lists("imgq.tqueued"))

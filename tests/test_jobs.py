"""Job records in a real Redis: creation, counts, idempotent bookkeeping, expiry."""

from __future__ import annotations

import pytest
import redis

from shared.jobs import JobError, JobStore, check_job_id, new_job_id, parse_task_id, task_id
from shared.schemas import ImageRef


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), ttl=3600)


def refs(n: int, prefix: str = "img") -> list[ImageRef]:
    return [ImageRef(src=f"{prefix}{i}.jpg", ref=f"/data/{prefix}{i}.jpg") for i in range(n)]


def test_task_ids_round_trip() -> None:
    tid = task_id("job-1", "resnet50", 12)
    assert tid == "job-1.resnet50.000012"
    assert parse_task_id(tid) == ("job-1", "resnet50", 12)
    assert check_job_id(new_job_id())
    for bad in ("", "a.b", "a b", "x" * 65, "../x"):
        with pytest.raises(JobError):
            check_job_id(bad)


def test_create_and_read_back(store: JobStore) -> None:
    images = refs(10)
    chunks = [images[0:4], images[4:8], images[8:10]]
    job = store.create("jobs-create", ["m1", "m2"], chunks, chunk_size=4)
    again = store.get("jobs-create")
    assert again.models == ("m1", "m2")
    assert again.total_images == 10 and again.n_chunks == 3 and again.chunk_size == 4
    assert abs(again.created - job.created) < 1e-6
    assert store.chunk("jobs-create", 1) == images[4:8]
    assert [store.chunk("jobs-create", i) for i in range(3)] == chunks
    assert [job.chunk_len(i) for i in range(3)] == [4, 4, 2]
    with pytest.raises(JobError, match="has no chunk 3"):
        store.chunk("jobs-create", 3)
    with pytest.raises(JobError, match="unknown or has expired"):
        store.chunk("jobs-never", 0)
    assert job.task_ids("m1") == [task_id("jobs-create", "m1", i) for i in range(3)]
    ttl = store.client.ttl("imgq:job:jobs-create:chunks")
    assert 3500 < int(ttl) <= 3600  # type: ignore[arg-type]


def test_same_id_twice_is_refused(store: JobStore) -> None:
    store.create("jobs-dup", ["m1"], [refs(1)], chunk_size=1)
    with pytest.raises(JobError, match="already exists"):
        store.create("jobs-dup", ["m1"], [refs(2)], chunk_size=1)
    assert store.get("jobs-dup").total_images == 1


def test_counts_and_duplicate_finishes(store: JobStore) -> None:
    store.create("jobs-count", ["m1", "m2"], [refs(4), refs(3)], chunk_size=4)
    status = store.status("jobs-count")
    assert status.models["m1"].as_dict() == {"total": 7, "done": 0, "failed": 0, "pending": 7}
    assert not status.finished
    store.mark_finished(task_id("jobs-count", "m1", 0), ok=3, failed=1)
    # A task delivered twice reports twice: counted once.
    store.mark_finished(task_id("jobs-count", "m1", 0), ok=3, failed=1)
    store.mark_finished(task_id("jobs-count", "m1", 1), ok=3, failed=0)
    status = store.status("jobs-count")
    assert status.models["m1"].as_dict() == {"total": 7, "done": 6, "failed": 1, "pending": 0}
    assert status.models["m2"].pending == 7
    assert not status.finished
    store.mark_finished(task_id("jobs-count", "m2", 0), ok=4, failed=0)
    store.mark_finished(task_id("jobs-count", "m2", 1), ok=0, failed=3)
    status = store.status("jobs-count")
    assert status.finished
    assert status.images_finished == status.images_total == 14


def test_unknown_or_expired_job(store: JobStore) -> None:
    with pytest.raises(JobError, match="unknown or has expired"):
        store.get("never-submitted")
    short = JobStore(store.client, ttl=1)
    short.create("jobs-expire", ["m"], [refs(1)], chunk_size=1)
    store.client.pexpire("imgq:job:jobs-expire", 1)
    import time

    time.sleep(0.05)
    with pytest.raises(JobError, match="IMGQ_RESULT_EXPIRES"):
        store.get("jobs-expire")


def test_waiters_are_woken_when_a_task_finishes(store: JobStore) -> None:
    import threading
    import time

    store.create("jobs-listen", ["m"], [refs(1), refs(1)], chunk_size=1)
    listener = store.listen("jobs-listen")
    try:
        start = time.monotonic()
        assert listener.wait(0.2) is False  # nothing happened: the full timeout
        assert time.monotonic() - start >= 0.15
        timer = threading.Timer(
            0.1, lambda: store.mark_finished(task_id("jobs-listen", "m", 0), ok=1, failed=0)
        )
        timer.start()
        start = time.monotonic()
        assert listener.wait(5.0) is True
        assert time.monotonic() - start < 2.0  # woken, not timed out
        timer.join()
    finally:
        listener.close()


def test_every_key_of_a_new_job_expires(store: JobStore) -> None:
    from shared import keys

    store.create("jobs-ttl", ["m"], [refs(1)] * 2500, chunk_size=1)  # three batches of chunks
    for key in (keys.job("jobs-ttl"), keys.job_chunks("jobs-ttl"), keys.JOB_INDEX):
        assert 3500 < int(store.client.ttl(key)) <= 3600, key  # type: ignore[arg-type]
    assert store.client.llen(keys.job_chunks("jobs-ttl")) == 2500
    store.mark_finished(task_id("jobs-ttl", "m", 0), ok=1, failed=0)
    assert 3500 < int(store.client.ttl(keys.job_done("jobs-ttl"))) <= 3600  # type: ignore[arg-type]


def test_a_producer_killed_mid_create_leaves_nothing_without_a_ttl(redis_url: str) -> None:
    """The id is claimed with its TTL in one step, and every chunk batch goes in with
    the list's TTL: whenever the producer dies, every key it wrote expires. The job it
    was listing says its listing stopped once the lease lapses, and is given up
    (cancelled, the reason kept) once."""
    import signal
    import subprocess
    import sys
    import time

    from shared.jobs import LISTER_GONE
    from tests.conftest import ROOT

    client = redis.Redis.from_url(redis_url)
    job_id = "jobs-killed"
    script = (
        "import redis\n"
        "from shared.jobs import JobStore\n"
        "from shared.schemas import ImageRef\n"
        f"store = JobStore(redis.Redis.from_url({redis_url!r}), ttl=3600, listing_lease=0.3)\n"
        "chunk = [ImageRef(src='a.jpg', ref='/data/a.jpg')]\n"
        f"store.create({job_id!r}, ['m'], [chunk] * 400_000, chunk_size=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not client.exists(f"imgq:job:{job_id}:chunks"):
            assert proc.poll() is None and time.monotonic() < deadline, "create never started"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        names = list(client.scan_iter(match=f"*{job_id}*", count=1000))
        assert names
        assert all(int(client.ttl(k)) > 0 or int(client.pttl(k)) > 0 for k in names), {  # type: ignore[arg-type]
            k: client.ttl(k) for k in names
        }
        # The id stays taken until it expires; the half-listed job says so.
        store = JobStore(client, ttl=3600)
        with pytest.raises(JobError, match="already exists"):
            store.create(job_id, ["m"], [refs(1)], chunk_size=1)
        half = store.get(job_id)
        assert half.listing and 0 < half.n_chunks < 400_000
        assert half.total_images == half.n_chunks == client.llen(f"imgq:job:{job_id}:chunks")
        time.sleep(0.4)  # the lease lapses
        assert store.get(job_id).listing_error == LISTER_GONE
        assert not store.status(job_id).finished
        assert store.give_up_listing(job_id)
        assert not store.give_up_listing(job_id)  # once
        gone = store.get(job_id)
        assert gone.cancelled is not None and not gone.listing
        assert gone.listing_error == LISTER_GONE
    finally:
        if proc.poll() is None:
            proc.kill()
        client.delete(*client.scan_iter(match=f"*{job_id}*"))


def test_delete_takes_every_key_of_a_job(store: JobStore) -> None:
    from shared import keys, open_jobs
    from shared.jobs import AttemptStore

    job_id = "jobs-delete"
    store.create(job_id, ["m1", "m2"], [refs(2), refs(1)], chunk_size=2)
    open_jobs.track(store.client, job_id)
    attempts = AttemptStore(store.client, ttl=3600)
    tid = task_id(job_id, "m2", 1)
    attempts.begin(tid)
    attempts.set_inflight(tid, 0)
    attempts.strike(tid, 0)
    store.mark_finished(task_id(job_id, "m1", 0), ok=2, failed=0)
    store.client.set(keys.job_notified(job_id), "sent", ex=60)
    store.client.hset(keys.sweep_state(job_id), "finished", "1")
    assert store.delete(job_id) == 8  # record, chunks, done, notified, sweep, 3 of the task
    assert not list(store.client.scan_iter(match=f"*{job_id}*"))
    assert store.client.zscore(keys.JOB_INDEX, job_id) is None
    assert store.client.zscore(keys.OPEN_JOBS, job_id) is None
    with pytest.raises(JobError, match="unknown"):
        store.get(job_id)


def test_chunks_are_compressed_and_plain_json_ones_still_read(store: JobStore) -> None:
    """A chunk is one list element (one LINDEX per chunk), zlib-compressed JSON; chunks
    written as plain JSON by earlier versions read back the same."""
    import json

    from shared import keys
    from shared.contract import encode_images

    images = [
        ImageRef(src=f"/srv/archive/roll-{i:05d}.jpg", ref=f"/srv/archive/roll-{i:05d}.jpg")
        for i in range(32)
    ]
    store.create("jobs-zip", ["m"], [images, images[:3]], chunk_size=32)
    raw = store.client.lindex(keys.job_chunks("jobs-zip"), 0)
    assert isinstance(raw, bytes) and len(raw) * 4 < len(json.dumps(encode_images(images)))
    assert store.chunk("jobs-zip", 0) == images
    store.client.rpush(keys.job_chunks("jobs-zip"), json.dumps(encode_images(images[:2])))
    assert store.chunk("jobs-zip", 2) == images[:2]

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

"""Parts of a worker on a real Redis, without a worker process: the memory of
cancelled jobs, and where a chunk's rows go."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from shared.jobs import JobStore
from shared.results_store import delete_job_records
from shared.schemas import ImageRef
from workers.cancel import CancelWatch
from workers.results import first_position


@pytest.fixture
def jobs(redis_url: str) -> Iterator[JobStore]:
    """A job store on the test Redis."""
    client = redis.Redis.from_url(redis_url)
    yield JobStore(client, ttl=600)
    client.close()


def refs(n: int) -> list[ImageRef]:
    return [ImageRef(src=f"img{i}.jpg", ref=f"/data/img{i}.jpg") for i in range(n)]


def test_cancel_watch_remembers_a_bounded_number_of_cancelled_jobs(jobs: JobStore) -> None:
    ids = [f"cw-{uuid.uuid4().hex[:8]}-{i}" for i in range(5)]
    for jid in ids:
        jobs.create(jid, ["m"], [refs(1)], chunk_size=1)
        jobs.client.hset(f"imgq:job:{jid}", "cancelled", "1")
    watch = CancelWatch(jobs, keep=3)
    for jid in ids:
        assert watch.is_cancelled(jid, fresh=True)
    assert watch.is_cancelled(ids[2])  # asked again: the most recent now
    assert list(watch._cancelled) == [ids[3], ids[4], ids[2]]
    # A job forgotten is read again from Redis, and still found cancelled.
    assert watch.is_cancelled(ids[0], fresh=True)
    assert len(watch._cancelled) == 3 and ids[3] not in watch._cancelled
    for jid in ids:
        delete_job_records(jobs, jobs.get(jid))


def test_first_position_follows_a_resubmitted_jobs_chunk_size(jobs: JobStore) -> None:
    jid = f"pos-{uuid.uuid4().hex[:8]}"
    jobs.create(jid, ["m"], [refs(2), refs(2), refs(1)], chunk_size=2)
    assert first_position(jid, 2, jobs) == 4
    # imgq delete, then the same id again with chunks of 3.
    delete_job_records(jobs, jobs.get(jid))
    jobs.create(jid, ["m"], [refs(3), refs(2)], chunk_size=3)
    assert first_position(jid, 1, jobs) == 3
    delete_job_records(jobs, jobs.get(jid))

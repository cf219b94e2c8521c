"""Parts of a worker on a real Redis, without a worker process: the memory of
cancelled jobs, where a chunk's rows go, and a task's STARTED state beside another
delivery's result."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import states

from shared.celery_app import create_app
from shared.jobs import JobStore
from shared.results_store import delete_job_records
from shared.schemas import ImageRef
from shared.settings import Settings
from workers.cancel import CancelWatch
from workers.results import first_position, mark_started


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


@pytest.mark.parametrize("lands_after", [0, 1, 2])
def test_started_never_hides_a_result_stored_by_another_delivery(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, lands_after: int
) -> None:
    """Two deliveries of one task (a worker frozen past its heartbeat, its tasks run
    elsewhere): the other delivery stores the task's result after this one's
    ``lands_after``-th Redis command of marking it started. Whatever the moment, the
    result stays: a STARTED over it hid a finished task's records from the producer
    (Celery's store_result reads, then writes)."""
    backend = create_app(Settings(broker_url=redis_url)).backend
    other = create_app(Settings(broker_url=redis_url)).backend
    tid = f"st-{uuid.uuid4().hex[:8]}.m.000004"
    records = [{"image": "img8.jpg", "model": "m"}]

    def other_delivery_stores() -> None:
        other.store_result(tid, records, states.SUCCESS)

    if lands_after == 0:
        other_delivery_stores()
    client = backend.client
    original = client.execute_command
    sent = 0

    def execute_command(*args: Any, **kwargs: Any) -> Any:
        nonlocal sent
        reply = original(*args, **kwargs)
        sent += 1
        if sent == lands_after:
            other_delivery_stores()
        return reply

    monkeypatch.setattr(client, "execute_command", execute_command)
    written = mark_started(backend, tid, {"pid": 1, "hostname": "a@host"})
    monkeypatch.undo()
    if lands_after > sent:  # the marking sent fewer commands: the result comes after
        other_delivery_stores()
    meta = other.get_task_meta(tid)
    assert meta["status"] == states.SUCCESS and meta["result"] == records
    assert written is (lands_after != 0)


def test_started_is_written_with_the_results_expiry(redis_url: str) -> None:
    backend = create_app(Settings(broker_url=redis_url, result_expires=900)).backend
    tid = f"st-{uuid.uuid4().hex[:8]}.m.000000"
    assert mark_started(backend, tid, {"pid": 7, "hostname": "a@host"}) is True
    meta = backend.get_task_meta(tid)
    assert meta["status"] == states.STARTED
    assert meta["result"] == {"pid": 7, "hostname": "a@host"}
    assert 0 < backend.client.ttl(backend.get_key_for_task(tid)) <= 900
    # A second delivery marks it again (no outcome yet); a retry's state is no outcome.
    assert mark_started(backend, tid, {"pid": 8, "hostname": "b@host"}) is True
    backend.store_result(tid, None, states.RETRY)
    assert mark_started(backend, tid, {"pid": 8, "hostname": "b@host"}) is True
    for final in (states.FAILURE, states.REVOKED):
        backend.store_result(tid, {"exc_type": "X", "exc_message": "x"}, final)
        assert mark_started(backend, tid, {"pid": 9, "hostname": "c@host"}) is False
        assert backend.get_task_meta(tid)["status"] == final
        backend.client.delete(backend.get_key_for_task(tid))
    # A value that is not Celery's JSON is left alone.
    backend.client.set(backend.get_key_for_task(tid), b"\x80not json")
    assert mark_started(backend, tid, {"pid": 9, "hostname": "c@host"}) is False

"""The sweep for lost tasks, in-process against a Redis server of its own: what one pass
reads, what it sends again, and its lock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared import keys, open_jobs
from shared.celery_app import create_app, job_store_for
from shared.contract import task_id
from shared.jobs import JobStore
from shared.kombu_redis import queued_task_ids
from shared.liveness import BrokerRedis
from shared.priority import queue_lists
from shared.schemas import ImageRef
from shared.settings import Settings
from tests.conftest import RedisServer
from workers.sweep import LockLost, SweepLock, _resend, sweep


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerRedis]:
    """A broker (and job store) on a Redis server no worker uses: its command counts
    are this test's."""
    server = RedisServer(tmp_path / "redis").start()
    b = BrokerRedis(create_app(Settings(broker_url=server.url, sweep_grace=1)))
    try:
        yield b
    finally:
        b.close()
        server.stop()


def calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))  # type: ignore[union-attr]


def stuck_job(store: JobStore, job_id: str, model: str, chunks: int) -> None:
    """A recorded, open job that has made no progress for a long time."""
    record = store.create(
        job_id, [model], [[ImageRef(src="a.jpg", ref="/a.jpg")]] * chunks, chunk_size=1
    )
    open_jobs.track(store.client, job_id)
    store.client.hset(
        keys.sweep_state(job_id),
        mapping={"finished": "0", "since": repr(time.time() - 600), "suspects": "[]"},
    )
    assert record.n_chunks == chunks


def test_one_pass_reads_each_queue_once_and_sends_only_lost_tasks(broker: BrokerRedis) -> None:
    app, r = broker.app, broker.client
    settings = Settings(broker_url=app.conf.broker_url, sweep_grace=1)
    store = job_store_for(app)
    stuck_job(store, "sw-a", "msw", 4)
    stuck_job(store, "sw-b", "msw", 2)
    record = store.get("sw-a")
    _resend(app, record, task_id("sw-a", "msw", 0))  # waiting in the queue
    _resend(app, record, task_id("sw-a", "msw", 1))
    taken = broker.channel.basic_get("imgq.msw", no_ack=False)  # delivered, not acked
    assert taken.headers["id"] == task_id("sw-a", "msw", 0)  # the older one goes first
    lrange, hvals = calls(r, "lrange"), calls(r, "hvals")
    # First look: suspects only (a task in flight may be between two places).
    assert sweep(app, broker, settings, by="test", pace_s=0.001) == 0
    lists = len(queue_lists("imgq.msw"))
    assert calls(r, "lrange") - lrange == lists  # once per list, not once per stuck job
    assert calls(r, "hvals") - hvals == 1
    assert not r.exists(keys.SWEEP_LOCK)  # released at the end of the pass
    time.sleep(0.01)
    # Second look: the lost ones, and only those, are sent again.
    assert sweep(app, broker, settings, by="test", pace_s=0.001) == 4
    queued = queued_task_ids(r, queue_lists("imgq.msw"))
    assert queued == {
        task_id("sw-a", "msw", 1),
        task_id("sw-a", "msw", 2),
        task_id("sw-a", "msw", 3),
        task_id("sw-b", "msw", 0),
        task_id("sw-b", "msw", 1),
    }
    assert sum(int(r.llen(name)) for name in queue_lists("imgq.msw")) == 5  # type: ignore[arg-type]
    assert int(r.get(keys.TASKS_RESENT) or 0) == 4


def test_the_lock_is_a_token_renewed_and_released(broker: BrokerRedis) -> None:
    r = broker.client
    one = SweepLock(r, lock_s=0.3, pace_s=0.001)
    two = SweepLock(r, lock_s=5, pace_s=0.001)
    assert one.acquire()
    time.sleep(0.01)
    assert not two.acquire()  # one pass at a time
    for _ in range(4):  # renewed, it outlives its first lifetime
        time.sleep(0.12)
        one.renew()
    assert r.get(keys.SWEEP_LOCK) == one.token.encode()
    two.release()  # not two's: stays
    assert r.get(keys.SWEEP_LOCK) == one.token.encode()
    one.release()
    assert not r.exists(keys.SWEEP_LOCK)
    assert two.acquire()
    with pytest.raises(LockLost):  # taken over: one's pass must stop
        one._renewed = 0.0
        one.renew()
    # The pace: no pass starts within it of the last start, lock or no lock.
    two.release()
    three = SweepLock(r, lock_s=5, pace_s=60)
    r.delete(keys.SWEEP_PACE)
    assert three.acquire()
    three.release()
    assert not SweepLock(r, lock_s=5, pace_s=60).acquire()


def test_a_listing_whose_lister_died_is_given_up_once(broker: BrokerRedis) -> None:
    """A job whose producer died while listing its sources (the lease lapsed) will never
    be complete: the sweep cancels it, says why in its record and empties its queue."""
    from shared.jobs import LISTER_GONE, encode_chunk

    app = broker.app
    settings = Settings(broker_url=app.conf.broker_url, sweep_grace=1)
    store = job_store_for(app)
    lister = JobStore(store.client, ttl=3600, listing_lease=0.2)
    lister.begin("sw-lost", ["msw"], chunk_size=1)
    lister.append("sw-lost", [encode_chunk([ImageRef(src="a.jpg", ref="/a.jpg")])] * 2, 2)
    open_jobs.track(store.client, "sw-lost")
    record = store.get("sw-lost")
    _resend(app, record, task_id("sw-lost", "msw", 0))
    # Its lister is alive: nothing to give up, and the job stays open.
    assert sweep(app, broker, settings, by="test", pace_s=0.001) == 0
    assert store.get("sw-lost").cancelled is None
    assert "sw-lost" in open_jobs.open_jobs(store.client)
    time.sleep(0.3)  # the lease lapses
    sweep(app, broker, settings, by="test", pace_s=0.001)
    gone = store.get("sw-lost")
    assert gone.cancelled is not None and not gone.listing and gone.listing_error == LISTER_GONE
    assert not queued_task_ids(broker.client, queue_lists("imgq.msw"))
    assert "sw-lost" not in open_jobs.open_jobs(store.client)

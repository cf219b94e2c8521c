"""The sweep for tasks lost on the way: the one place that decides to send a task again.

What it covers. kombu's Redis transport takes a message off its queue and then
records it as unacknowledged, in two steps; a worker killed between them loses the
message, and a Redis failover can lose writes (a queued message, a delivery). Such a
task is in no queue, held by no worker and has no result: nothing else would ever
run it. The sweep finds those tasks, for every open job (:mod:`shared.open_jobs`),
whether or not a producer waits for it (``Job.wait`` sends nothing itself), and
sends them again. What it does not cover: a task waiting in a queue (however long:
behind other work, at a low priority) or held by a worker (a live one runs it; a
dead one's is put back by the recovery in :mod:`shared.liveness`), a job not in the
open-job index, and a job that is cancelled, deleted or expired (``job_wanted``).

A job whose sources are still being listed stays open however many of its tasks
have finished. One whose lister died (its lease lapsed, ``shared.jobs``) will never
be complete: the sweep gives its listing up, which cancels it with the reason in
its record, takes its queued tasks off the queues and sends its completion callback.

How. One sweeper at a time, fleet-wide: a token lock, renewed during a long pass and
released at its end (compare-and-delete), and a pace key so that passes start at
least ``pace_s`` seconds (4.5) apart whichever worker runs them: two looks at a job
are seconds apart. A pass first walks the open jobs and keeps those still wanted
that have made no progress for ``IMGQ_SWEEP_GRACE`` seconds (usually none: then the
pass reads nothing else). Only
then, once per pass whatever the number of stuck jobs, it reads the task ids in the
queues of their models (every priority list) and in ``unacked``, then each stuck
job's results: the order in which a task moves, so a task in flight is never seen
in none of them. A task with no result, in no queue and not unacknowledged is a
suspect; a suspect still lost at the next pass is sent again under its own id (a
rerun is harmless: fixed ids), logged and counted (``imgq_tasks_resent_total``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from shared import keys
from shared.celery_app import CLASSIFY_TASK, job_store_for
from shared.contract import ClassifyMessage, parse_task_id
from shared.jobctl import purge_queued
from shared.jobs import LISTER_GONE, JobError, JobRecord, JobStore
from shared.kombu_redis import queued_task_ids, unacked_task_ids
from shared.liveness import RESENT_KEY, BrokerRedis
from shared.notify import notify_job_end
from shared.open_jobs import open_jobs, untrack
from shared.priority import queue_lists, transport_priority
from shared.settings import Settings

log = logging.getLogger(__name__)

SWEEP_LOCK_KEY = keys.SWEEP_LOCK
# A pass holds the lock this long unless it renews it (it does, at every job and
# every page of a queue it reads).
LOCK_S = 15.0


class LockLost(RuntimeError):
    """The sweep's lock expired or went to another sweeper mid-pass: the pass stops."""


# Take the turn: nobody's pass is running (the lock) and none started in the last
# pace (the pace key). KEYS: lock, pace. ARGV: token, lock ms, pace ms.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# Renew (ARGV[2]: ms) or release (no ARGV[2]) the lock if it is still ours.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class SweepLock:
    """One sweep pass at a time, fleet-wide: a token lock on the broker's Redis that
    its holder renews while its pass runs and deletes (compare-and-delete) at the
    end; passes are also spaced ``pace_s`` apart."""

    def __init__(self, client: redis.Redis, *, lock_s: float, pace_s: float) -> None:
        self.client = client
        self.lock_ms = max(1, int(lock_s * 1000))
        self.pace_ms = max(1, int(pace_s * 1000))
        self.token = uuid.uuid4().hex
        self._renewed = 0.0

    def acquire(self) -> bool:
        """Take the turn; False while another pass runs or one started within the pace."""
        got = self.client.eval(
            _ACQUIRE, 2, SWEEP_LOCK_KEY, keys.SWEEP_PACE, self.token, self.lock_ms, self.pace_ms
        )
        self._renewed = time.monotonic()
        return bool(int(got))

    def renew(self) -> None:
        """Keep the lock (a round trip at most every third of its lifetime); LockLost
        when it is no longer ours."""
        if (time.monotonic() - self._renewed) * 1000 < self.lock_ms / 3:
            return
        if not int(self.client.eval(_RENEW, 1, SWEEP_LOCK_KEY, self.token, self.lock_ms)):
            raise LockLost("the sweep's lock expired mid-pass")
        self._renewed = time.monotonic()

    def release(self) -> None:
        """Give the lock back if it is still ours."""
        self.client.eval(_RELEASE, 1, SWEEP_LOCK_KEY, self.token)


def job_wanted(store: JobStore, job_id: str) -> JobRecord | None:
    """The job's record while the job is still wanted (recorded, not expired, not
    cancelled); else None.

    The one place that decides whether the sweep keeps working on a job.
    """
    try:
        record = store.get(job_id)
    except JobError:
        return None
    return None if record.cancelled is not None else record


@dataclass
class _Stuck:
    """An open job without progress for the grace period, and what the sweep knew of it."""

    record: JobRecord
    since: float
    suspects: set[str]


def sweep(
    app: Any,
    broker: BrokerRedis,
    settings: Settings,
    *,
    by: str,
    lock_s: float = LOCK_S,
    pace_s: float = 4.5,
) -> int:
    """One sweep over the open jobs (skipped while another process runs one, or one
    started less than ``pace_s`` ago); how many tasks were sent again."""
    lock = SweepLock(broker.client, lock_s=lock_s, pace_s=pace_s)
    if not lock.acquire():
        return 0
    try:
        return _pass(app, broker, settings, lock)
    except LockLost:
        log.warning("sweep by %s: the lock expired mid-pass; the next pass carries on", by)
        return 0
    finally:
        lock.release()


def _pass(app: Any, broker: BrokerRedis, settings: Settings, lock: SweepLock) -> int:
    store = job_store_for(app)
    now = time.time()
    stuck: list[_Stuck] = []
    for job_id in open_jobs(store.client):
        lock.renew()
        record = job_wanted(store, job_id)
        if record is None:
            _forget(store, job_id)
            continue
        if record.listing and record.listing_error:
            _give_up_listing(broker, store, record, settings)
            continue
        found = _stalled(store, record, settings, now)
        if found is not None:
            stuck.append(found)
    if not stuck:
        return 0
    # Once per pass, whatever the number of stuck jobs: the queues of their models,
    # then the deliveries, then (per job) the results: the order a task moves in.
    queues = sorted({s.record.queue_of(m) for s in stuck for m in s.record.models})
    lists = [name for queue in queues for name in queue_lists(queue)]
    queued = queued_task_ids(broker.client, lists, each_page=lock.renew)
    lock.renew()
    seen = queued | unacked_task_ids(broker.client)
    sent = 0
    for job in stuck:
        lock.renew()
        sent += _settle(app, broker, store, job, seen, now)
    return sent


def _give_up_listing(
    broker: BrokerRedis, store: JobStore, record: JobRecord, settings: Settings
) -> None:
    """Cancel a job whose lister went away before its listing ended: its tasks so far
    leave the queues, and its callback (if any) says it was cancelled."""
    job_id = record.job_id
    if not store.give_up_listing(job_id):
        return  # its lister came back in time, or someone else gave it up
    removed = purge_queued(broker.client, record)
    store.client.publish(keys.job_progress(job_id), "cancelled")
    log.warning("job %s: %s; cancelled (%d queued task(s) removed)", job_id, LISTER_GONE, removed)
    _forget(store, job_id)
    try:
        notify_job_end(store, job_id, "cancelled", settings)
    except Exception:
        log.exception("job %s: could not send its completion callback", job_id)


def _forget(store: JobStore, job_id: str) -> None:
    untrack(store.client, job_id)
    store.client.delete(keys.sweep_state(job_id))


def _stalled(store: JobStore, record: JobRecord, settings: Settings, now: float) -> _Stuck | None:
    """The job when it has made no progress for the grace period; None otherwise
    (progress is recorded, a finished job leaves the index)."""
    job_id = record.job_id
    # A count first (HLEN): a big job's task ids are read only once it is stuck.
    n_finished = int(store.client.hlen(keys.job_done(job_id)))
    if not record.listing and n_finished >= record.n_chunks * len(record.models):
        _forget(store, job_id)
        return None
    raw: dict[bytes, bytes] = store.client.hgetall(keys.sweep_state(job_id))  # type: ignore[assignment]
    state = {k.decode(): v.decode() for k, v in raw.items()}
    if int(state.get("finished", -1)) != n_finished:
        # Progress since the last look: nothing is stuck.
        _save(store, job_id, finished=n_finished, since=now, suspects=[])
        return None
    since = float(state["since"])
    if now - since < settings.sweep_grace:
        return None
    return _Stuck(record, since, set(json.loads(state.get("suspects", "[]"))))


def _settle(
    app: Any, broker: BrokerRedis, store: JobStore, job: _Stuck, seen: set[str], now: float
) -> int:
    """Send again the job's tasks lost at this pass and the last; remember the others."""
    record = job.record
    job_id = record.job_id
    finished = store.finished_tasks(job_id)  # read after the queues and deliveries
    lost = {
        tid
        for model in record.models
        for tid in record.task_ids(model)
        if tid not in finished and tid not in seen
    }
    confirmed = sorted(lost & job.suspects)
    for tid in confirmed:
        _resend(app, record, tid)
    if confirmed:
        broker.client.incrby(RESENT_KEY, len(confirmed))
        log.warning(
            "job %s: no progress for %.0f s and %d task(s) in no queue, held by no worker "
            "and without a result: sent again (%s)",
            job_id,
            now - job.since,
            len(confirmed),
            ", ".join(confirmed[:5]),
        )
    # Nothing suspect, or sent again: look again after another grace period.
    restart = not lost or bool(confirmed)
    _save(
        store,
        job_id,
        finished=len(finished),
        since=now if restart else job.since,
        suspects=sorted(lost - set(confirmed)),
    )
    return len(confirmed)


def _save(
    store: JobStore, job_id: str, *, finished: int, since: float, suspects: list[str]
) -> None:
    key = keys.sweep_state(job_id)
    pipe = store.client.pipeline(transaction=True)
    pipe.hset(
        key,
        mapping={"finished": str(finished), "since": repr(since), "suspects": json.dumps(suspects)},
    )
    pipe.expire(key, store.ttl)
    pipe.execute()


def _resend(app: Any, record: JobRecord, tid: str) -> None:
    """Send a task again under its own id, naming its chunk of the job record, at the
    job's priority and with its name (as the producer sent it)."""
    job_id, model, index = parse_task_id(tid)
    try:
        size = record.chunk_len(index)
    except JobError:
        log.error("job %s has no chunk %d: task %s not sent again", job_id, index, tid)
        return
    message = ClassifyMessage(job_id=job_id, model=model, chunk=index, size=size)
    app.send_task(
        CLASSIFY_TASK,
        args=message.to_args(),
        task_id=message.task_id,
        queue=record.queue_of(model),
        priority=transport_priority(record.priority),
        argsrepr=message.argsrepr(name=record.name),
        kwargsrepr="{}",
    )

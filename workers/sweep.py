"""The sweep for tasks lost on the way, for jobs nobody waits for.

kombu's Redis transport takes a message off its queue and then records it as
unacknowledged, in two steps; a worker killed between them loses the message (and a
Redis failover can lose writes). A waiting producer notices the job stalling and
sends the unfinished tasks again; without one, the workers do it here.

One sweeper at a time, fleet-wide, every few seconds. For each open job
(:mod:`shared.open_jobs`) that is still wanted and has made no progress for
``IMGQ_SWEEP_GRACE`` seconds, a task counts as lost when it has no result, is in
none of its model's queues and is not unacknowledged (held by a worker, or waiting
for the dead-worker recovery). A task found lost in two sweeps in a row is sent
again; its fixed id makes a rerun harmless. Reads go queue, then unacknowledged,
then results, the order in which a task moves, so a task in flight is never seen
in none of them, and the second look catches the rest.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from shared.broker_keys import UNACKED_KEY
from shared.celery_app import CLASSIFY_TASK, job_store_for
from shared.contract import ClassifyMessage, parse_task_id, task_id
from shared.jobs import JobError, JobRecord, JobStore
from shared.liveness import RESENT_KEY, BrokerRedis, task_id_of
from shared.open_jobs import open_jobs, untrack
from shared.priority import transport_priority
from shared.registry import queue_for
from shared.settings import Settings

log = logging.getLogger(__name__)

SWEEP_LOCK_KEY = "imgq:lock:sweep"
_PAGE = 1000


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


def _state_key(job_id: str) -> str:
    return f"imgq:sweep:{job_id}"


def sweep(
    app: Any, broker: BrokerRedis, settings: Settings, *, by: str, lock_s: float = 4.5
) -> int:
    """One sweep over the open jobs (skipped while another process holds the turn);
    how many tasks were sent again."""
    bclient = broker.client
    if not bclient.set(SWEEP_LOCK_KEY, by, nx=True, px=int(lock_s * 1000)):
        return 0
    store = job_store_for(app)
    sent = 0
    for job_id in open_jobs(store.client):
        record = job_wanted(store, job_id)
        if record is None:
            untrack(store.client, job_id)
            store.client.delete(_state_key(job_id))
            continue
        sent += _sweep_job(app, broker, store, record, settings)
    return sent


def _sweep_job(
    app: Any, broker: BrokerRedis, store: JobStore, record: JobRecord, settings: Settings
) -> int:
    job_id = record.job_id
    # A count first (HLEN): a big job's task ids are read only once it is stuck.
    n_finished = int(store.client.hlen(store._key(job_id, ":done")))
    total = record.n_chunks * len(record.models)
    if n_finished >= total:
        untrack(store.client, job_id)
        store.client.delete(_state_key(job_id))
        return 0
    key = _state_key(job_id)
    raw: dict[bytes, bytes] = store.client.hgetall(key)  # type: ignore[assignment]
    state = {k.decode(): v.decode() for k, v in raw.items()}
    now = time.time()
    if int(state.get("finished", -1)) != n_finished:
        # Progress since the last look: nothing is stuck.
        _save(store, key, finished=n_finished, since=now, suspects=[])
        return 0
    if now - float(state["since"]) < settings.sweep_grace:
        return 0
    finished = store.finished_tasks(job_id)
    unfinished = {
        task_id(job_id, m, i)
        for m in record.models
        for i in range(record.n_chunks)
        if task_id(job_id, m, i) not in finished
    }
    models = sorted({m for m in record.models})
    lost = unfinished - _queued(broker, models, unfinished)
    lost -= _unacked(broker)
    lost -= set(store.finished_tasks(job_id))
    earlier = set(json.loads(state.get("suspects", "[]")))
    confirmed = sorted(lost & earlier)
    for tid in confirmed:
        _resend(app, record, tid)
    if confirmed:
        broker.client.incrby(RESENT_KEY, len(confirmed))
        log.warning(
            "job %s: no progress for %.0f s and %d task(s) in no queue, held by no worker "
            "and without a result: sent again (%s)",
            job_id,
            now - float(state["since"]),
            len(confirmed),
            ", ".join(confirmed[:5]),
        )
    # Nothing suspect, or sent again: look again after another grace period.
    restart = not lost or bool(confirmed)
    _save(
        store,
        key,
        finished=len(finished),
        since=now if restart else float(state["since"]),
        suspects=sorted(lost - set(confirmed)),
    )
    return len(confirmed)


def _save(store: JobStore, key: str, *, finished: int, since: float, suspects: list[str]) -> None:
    pipe = store.client.pipeline(transaction=False)
    pipe.hset(
        key,
        mapping={"finished": str(finished), "since": repr(since), "suspects": json.dumps(suspects)},
    )
    pipe.expire(key, store.ttl)
    pipe.execute()


def _queued(broker: BrokerRedis, models: list[str], wanted: set[str]) -> set[str]:
    """Those of ``wanted`` found in the models' queues (every priority level)."""
    channel = broker.channel
    found: set[str] = set()
    for model in models:
        queue = queue_for(model)
        names = dict.fromkeys(channel._q_for_pri(queue, p) for p in channel.priority_steps)
        for name in names:
            start = 0
            while True:
                page: list[bytes] = broker.client.lrange(name, start, start + _PAGE - 1)  # type: ignore[assignment]
                for raw in page:
                    tid = task_id_of(raw)
                    if tid in wanted:
                        found.add(tid)
                if len(page) < _PAGE:
                    break
                start += _PAGE
    return found


def _unacked(broker: BrokerRedis) -> set[str]:
    """Task ids of every delivered, unacknowledged message."""
    values: list[bytes] = broker.client.hvals(UNACKED_KEY)  # type: ignore[assignment]
    return {tid for raw in values if (tid := task_id_of(raw)) is not None}


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
        queue=queue_for(model),
        priority=transport_priority(record.priority),
        argsrepr=message.argsrepr(name=record.name),
        kwargsrepr="{}",
    )

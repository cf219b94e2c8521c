"""Job control on the job records: names, states, listing and cancelling.

A cancelled job keeps a ``cancelled`` field (its time) in its record. Workers read
it before anything else when a task of the job starts (``JobStore.is_cancelled``),
and between batches while one runs, so none of its tasks starts once it is set;
``cancel_job`` also takes the job's waiting messages off the model queues (on the
broker's Redis, which may be another server than the job records'). Results
of the tasks that finished stay; the images never classified are counted (the
job's ``pending``), they get no records.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

from shared import keys
from shared.jobs import JOB_INDEX_KEY, CallbackStatus, JobError, JobRecord, JobStatus, JobStore
from shared.kombu_redis import purge_task_prefix
from shared.notify import callback_status
from shared.priority import queue_lists

MAX_NAME_LENGTH = 200


class JobState(StrEnum):
    """Where a job is: its sources still being listed, nothing done yet, some done, all
    done, or cancelled."""

    LISTING = "listing"  # its sources are still being listed: its totals grow
    QUEUED = "queued"  # no image result yet
    RUNNING = "running"  # some image results, not all
    FINISHED = "finished"  # every task finished (results or errors for every image)
    CANCELLED = "cancelled"  # cancelled before it finished


class JobFinishedError(JobError):
    """The job has already finished: there is nothing to cancel."""


def check_name(name: str) -> str:
    """The job name, or a ValueError when it is too long or has control characters."""
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"job name is {len(name)} characters long; at most {MAX_NAME_LENGTH}")
    if not name.isprintable():
        raise ValueError(f"job name {name!r} has control characters (newlines, tabs ...)")
    return name


def state_of(status: JobStatus) -> JobState:
    """The state of a job from its status."""
    if status.cancelled:
        return JobState.CANCELLED
    if status.job.listing:
        return JobState.LISTING
    if status.finished:
        return JobState.FINISHED
    if status.images_finished == 0:
        return JobState.QUEUED
    return JobState.RUNNING


@dataclass(frozen=True)
class JobSummary:
    """One line of ``imgq jobs``: a job's identity and its counts over all its models."""

    job_id: str
    name: str
    created: float
    models: tuple[str, ...]
    priority: int
    state: JobState
    total: int  # images x models
    done: int
    failed: int
    pending: int  # for a cancelled job: never classified (or still in a model)
    callback: CallbackStatus | None = None  # with a notify URL: where its callback is

    @classmethod
    def of(cls, status: JobStatus) -> JobSummary:
        """The summary of a job's status."""
        job = status.job
        done = sum(c.done for c in status.models.values())
        failed = sum(c.failed for c in status.models.values())
        return cls(
            job_id=job.job_id,
            name=job.name,
            created=job.created,
            models=job.models,
            priority=job.priority,
            state=state_of(status),
            total=status.images_total,
            done=done,
            failed=failed,
            pending=status.images_total - done - failed,
            callback=status.callback,
        )

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """Plain JSON types, with the job's age in seconds."""
        return {
            "job_id": self.job_id,
            "name": self.name,
            "created": self.created,
            "age_s": round((now or time.time()) - self.created, 1),
            "models": list(self.models),
            "priority": self.priority,
            "state": self.state.value,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "pending": self.pending,
            "callback": None if self.callback is None else self.callback.as_dict(),
        }


def iter_jobs(store: JobStore, *, page: int = 100) -> Iterator[JobStatus]:
    """Status of every job still on record, newest first; expired ones leave the index."""
    start = 0
    while True:
        ids: list[bytes] = store.client.zrevrange(JOB_INDEX_KEY, start, start + page - 1)  # type: ignore[assignment]
        if not ids:
            return
        gone: list[bytes] = []
        for raw in ids:
            try:
                yield store.status(raw.decode())
            except JobError:
                gone.append(raw)
        if gone:
            store.client.zrem(JOB_INDEX_KEY, *gone)
        start += page - len(gone)


def list_jobs(
    store: JobStore, *, limit: int = 20, states: set[JobState] | None = None
) -> list[JobSummary]:
    """Up to ``limit`` jobs, newest first, only those in ``states`` when given."""
    out: list[JobSummary] = []
    if limit <= 0:
        return out
    for status in iter_jobs(store):
        summary = JobSummary.of(status)
        if states is None or summary.state in states:
            if status.job.notify:
                callback = callback_status(store, status.job)
                summary = dataclasses.replace(summary, callback=callback)
            out.append(summary)
            if len(out) >= limit:
                break
    return out


@dataclass(frozen=True)
class CancelOutcome:
    """What ``cancel_job`` did: messages taken off the queues, and the job's status after."""

    removed_tasks: int
    status: JobStatus
    already: bool  # the job had been cancelled before


# Marks the job cancelled unless it is unknown (no record) or already cancelled:
# one step, so two concurrent cancels agree on who did it.
_MARK = """
if redis.call('HEXISTS', KEYS[1], 'n_chunks') == 0 then return -1 end
return redis.call('HSETNX', KEYS[1], 'cancelled', ARGV[1])
"""

# Messages per script call when a cancelled job's messages leave a queue: Redis is
# never busy for long (about 20 ms when every message is the job's and is parsed),
# and the list is back in its order at the end (``shared.kombu_redis``).
PURGE_SLICE = 250


def purge_queued(broker: redis.Redis, record: JobRecord) -> int:
    """Take the job's waiting tasks off its models' queues, through a client on the
    broker's Redis; how many were removed. Messages missed (taken by a worker during
    the purge) are dropped by the workers."""
    job_id = record.job_id
    queues = sorted({record.queue_of(model) for model in record.models})
    lists = [key for queue in queues for key in queue_lists(queue)]
    # Task ids are <job>.<model>.<chunk>, and a job id has no '.'.
    return purge_task_prefix(broker, lists, f"{job_id}.", slice_=PURGE_SLICE)


def cancel_job(store: JobStore, broker: redis.Redis, job_id: str) -> CancelOutcome:
    """Cancel a job: no worker starts its tasks from now on, its waiting tasks leave
    the queues, and whoever waits for it is told. ``broker`` is a client on the
    broker's Redis (the queues), ``store`` the job records. JobError when the job is
    unknown, JobFinishedError when it has finished."""
    status = store.status(job_id)  # JobError when unknown or expired
    if status.cancelled:
        return CancelOutcome(removed_tasks=0, status=status, already=True)
    if status.finished:
        raise JobFinishedError(
            f"job {job_id} has already finished: nothing to cancel "
            f"({status.images_finished} image results)"
        )
    marked = int(store.client.eval(_MARK, 1, keys.job(job_id), repr(time.time())))
    if marked < 0:
        store.get(job_id)  # expired in between: its JobError
    removed = purge_queued(broker, status.job)
    # Wake waiters (imgq wait, Job.wait) so they report the cancel at once.
    store.client.publish(keys.job_progress(job_id), "cancelled")
    return CancelOutcome(removed_tasks=removed, status=store.status(job_id), already=marked == 0)

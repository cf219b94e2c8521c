"""Job control on the job records: names, states, listing and cancelling.

A cancelled job keeps a ``cancelled`` field (its time) in its record. Workers read
it before anything else when a task of the job starts (``JobStore.is_cancelled``),
and between batches while one runs, so none of its tasks starts once it is set;
``cancel_job`` also takes the job's waiting messages off the model queues. Results
of the tasks that finished stay; the images never classified are counted (the
job's ``pending``), they get no records.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shared.jobs import JOB_INDEX_KEY, JobError, JobStatus, JobStore
from shared.priority import queue_lists
from shared.registry import queue_for

MAX_NAME_LENGTH = 200


class JobState(StrEnum):
    """Where a job is: nothing done yet, some done, all done, or cancelled."""

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

# Takes a cancelled job's messages out of the oldest ``ARGV[1]`` messages of a list
# (one priority level of a queue) and puts the others back at the other end, in
# their order. Called once per slice until the whole list has gone round, so Redis
# is never busy for long (a slice of 1,000 messages takes milliseconds) and the list
# is in its original order again at the end; meanwhile, tasks that were behind the
# slices already moved can be taken first. Messages missed (taken by a worker during
# the purge) are dropped by the workers. A message's headers hold its task id as
# "id": "<job>.<model>.<chunk>"; JSON escapes quotes inside strings, so that text
# cannot come from a job name or a path.
_PURGE_SLICE = """
local items = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
if #items == 0 then return 0 end
redis.call('LTRIM', KEYS[1], 0, -#items - 1)
local keep = {}
local n = 0
for i = #items, 1, -1 do
  if string.find(items[i], ARGV[2], 1, true) then n = n + 1 else keep[#keep + 1] = items[i] end
end
if #keep > 0 then redis.call('LPUSH', KEYS[1], unpack(keep)) end
return n
"""
PURGE_SLICE = 1000


def purge_queued(store: JobStore, job_id: str, models: tuple[str, ...]) -> int:
    """Take the job's waiting tasks off its models' queues; how many were removed."""
    marker = f'"id": "{job_id}.'
    keys = [key for model in models for key in queue_lists(queue_for(model))]
    pipe = store.client.pipeline(transaction=False)
    for key in keys:
        pipe.llen(key)
    lengths = pipe.execute()
    removed = 0
    for key, length in zip(keys, lengths, strict=True):
        for _ in range(-(-int(length) // PURGE_SLICE)):  # every message once round
            removed += int(store.client.eval(_PURGE_SLICE, 1, key, PURGE_SLICE, marker))
    return removed


def cancel_job(store: JobStore, job_id: str) -> CancelOutcome:
    """Cancel a job: no worker starts its tasks from now on, its waiting tasks leave
    the queues, and whoever waits for it is told. JobError when it is unknown,
    JobFinishedError when it has finished."""
    status = store.status(job_id)  # JobError when unknown or expired
    if status.cancelled:
        return CancelOutcome(removed_tasks=0, status=status, already=True)
    if status.finished:
        raise JobFinishedError(
            f"job {job_id} has already finished: nothing to cancel "
            f"({status.images_finished} image results)"
        )
    marked = int(store.client.eval(_MARK, 1, store._key(job_id), repr(time.time())))
    if marked < 0:
        store.get(job_id)  # expired in between: its JobError
    removed = purge_queued(store, job_id, status.job.models)
    # Wake waiters (imgq wait, Job.wait) so they report the cancel at once.
    store.client.publish(store._key(job_id, ":progress"), "cancelled")
    return CancelOutcome(removed_tasks=removed, status=store.status(job_id), already=marked == 0)

"""Cancelled jobs in a worker: a task of a cancelled job is dropped before it decodes
anything, and images of a job cancelled while they wait for the model never reach it.

A dropped task leaves no result and no progress count (the job's images it held
stay "pending": never classified). It is acknowledged, marked REVOKED in the
result backend and announced with a ``task-revoked`` event, which is how Flower
shows a task that was not run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import NoReturn

import redis
from celery import Task
from celery.exceptions import Ignore

from shared.jobs import JobStore

log = logging.getLogger(__name__)

# How stale the answer for images waiting in the batcher may be: the batcher asks
# before every model call, and a Redis read per batch per job is enough.
RECHECK_S = 0.2
# How many cancelled jobs a worker remembers (the most recently asked about); a job
# forgotten is read from Redis again, and still found cancelled.
KEEP_CANCELLED = 10_000


class CancelWatch:
    """Answers "is this job cancelled?" from Redis, remembering a "no" for a moment."""

    def __init__(
        self, store: JobStore, *, recheck_s: float = RECHECK_S, keep: int = KEEP_CANCELLED
    ) -> None:
        self.store = store
        self.recheck_s = recheck_s
        self.keep = keep
        self._checked: dict[str, float] = {}  # job id -> when it was last seen not cancelled
        # Cancelled jobs, least recently asked about first; at most ``keep`` of them.
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def is_cancelled(self, job_id: str, *, fresh: bool = False) -> bool:
        """True once the job is cancelled; ``fresh`` reads Redis now.

        An unreachable Redis counts as "not cancelled": the task's own Redis
        writes will wait for it anyway, and a cancel is never undone.
        """
        with self._lock:
            if job_id in self._cancelled:
                self._cancelled.move_to_end(job_id)
                return True
        now = time.monotonic()
        if not fresh and now - self._checked.get(job_id, -1e9) < self.recheck_s:
            return False
        try:
            cancelled = self.store.is_cancelled(job_id)
        except redis.exceptions.RedisError as exc:
            log.warning("job %s: cannot read its cancel flag (%s)", job_id, exc)
            return False
        with self._lock:
            if cancelled:
                self._cancelled[job_id] = None
                self._cancelled.move_to_end(job_id)
                while len(self._cancelled) > self.keep:
                    self._cancelled.popitem(last=False)
                self._checked.pop(job_id, None)
            else:
                if len(self._checked) > 10_000:  # old jobs: forget them
                    self._checked.clear()
                self._checked[job_id] = now
        return cancelled


def drop_task(task: Task, job_id: str, *, state: str = "cancelled") -> NoReturn:
    """End a task of a cancelled (or deleted) job without a result: REVOKED for Flower,
    then acknowledged. ``state`` says why: "cancelled", or "gone" (no job record)."""
    tid = task.request.id
    log.info("job %s is %s: task %s dropped", job_id, state, tid)
    try:
        task.backend.mark_as_revoked(tid, reason=f"job {state}", request=task.request)
        task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    except Exception as exc:  # bookkeeping for monitors only: the task is dropped anyway
        log.warning("task %s: could not record it as revoked (%s)", tid, exc)
    raise Ignore()

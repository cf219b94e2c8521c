"""The index of jobs not known to be finished, which the workers' sweep walks.

``imgq:jobs:open`` is a sorted set (job id -> time submitted) next to the job
records. A producer adds a job when it submits it; the sweep removes it once it is
finished, expired or no longer wanted, and ``JobStore.delete`` when it is deleted.
"""

from __future__ import annotations

import time

import redis

from shared import keys

OPEN_JOBS_KEY = keys.OPEN_JOBS


def track(client: redis.Redis, job_id: str) -> None:
    """Add a job to the index (idempotent)."""
    client.zadd(OPEN_JOBS_KEY, {job_id: time.time()}, nx=True)


def untrack(client: redis.Redis, job_id: str) -> None:
    """Remove a job from the index."""
    client.zrem(OPEN_JOBS_KEY, job_id)


def open_jobs(client: redis.Redis) -> list[str]:
    """The job ids in the index, oldest first."""
    raw: list[bytes] = client.zrange(OPEN_JOBS_KEY, 0, -1)  # type: ignore[assignment]
    return [r.decode() for r in raw]

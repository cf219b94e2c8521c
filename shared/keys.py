"""Every Redis key imgq writes, named in one place.

Two Redis databases may be involved: the **broker** (``IMGQ_BROKER_URL``: queues,
kombu's delivery bookkeeping, worker liveness) and the **job store** (the result
backend's Redis, ``IMGQ_RESULT_BACKEND``: job records, progress, results). They are
the same database unless the result backend is set apart; code must read each key
through a client on the Redis it lives on. kombu's own keys (the queue lists,
``unacked``, ``unacked_index``) are kombu's to name: see ``shared.kombu_redis``.

The inventory, with its writers and lifetimes, is in ``docs/operations.md``
("Redis keys"); a test creates, runs and deletes a job and finds no key naming it.
"""

from __future__ import annotations

PREFIX = "imgq:"

# ---- job store: one job --------------------------------------------------------------

_JOB = PREFIX + "job:"


def job(job_id: str) -> str:
    """Hash: the job record (id, models, totals, chunk size, name, priority, ...)."""
    return f"{_JOB}{job_id}"


def job_chunks(job_id: str) -> str:
    """List: chunk i is the chunk's image references, JSON compressed with zlib
    (``shared.jobs.encode_chunk``; plain JSON as older versions wrote it)."""
    return f"{_JOB}{job_id}:chunks"


def job_listing(job_id: str) -> str:
    """String with a short TTL (``shared.jobs.LISTING_LEASE_S``): the lease of the
    process listing the job's sources, renewed while it lists, deleted at the end."""
    return f"{_JOB}{job_id}:listing"


def job_done(job_id: str) -> str:
    """Hash: task id -> "ok failed" for every finished task of the job."""
    return f"{_JOB}{job_id}:done"


def job_progress(job_id: str) -> str:
    """Pub/sub channel (not a key): a message per finished task, and on cancel."""
    return f"{_JOB}{job_id}:progress"


def job_notified(job_id: str) -> str:
    """String: the completion callback's claim as versions before the lease wrote it
    (nothing writes it now; it expires with the job)."""
    return f"{_JOB}{job_id}:notified"


def job_callback(job_id: str) -> str:
    """Hash: the completion callback's end state, delivery id, document, tries, last
    error and outcome (``shared.notify``)."""
    return f"{_JOB}{job_id}:callback"


def job_callback_lease(job_id: str) -> str:
    """String with a TTL of ``IMGQ_HEARTBEAT_TIMEOUT``: the lease of the process sending
    the completion callback, renewed while it tries."""
    return f"{_JOB}{job_id}:callback:lease"


def sweep_state(job_id: str) -> str:
    """Hash: what the lost-task sweep saw of the job at its last look."""
    return f"{PREFIX}sweep:{job_id}"


# ---- job store: one task -------------------------------------------------------------


def _task(tid: str, suffix: str) -> str:
    return f"{PREFIX}task:{tid}:{suffix}"


def task_attempts(tid: str) -> str:
    """String: deliveries of the task that started to run."""
    return _task(tid, "attempts")


def task_inflight(tid: str) -> str:
    """String: the image being worked on, one at a time, after a first crash."""
    return _task(tid, "inflight")


def task_partial(tid: str) -> str:
    """Hash: records already made by earlier deliveries, by position in the chunk."""
    return _task(tid, "partial")


def task_strikes(tid: str) -> str:
    """Hash: process deaths while an image was in flight, per image."""
    return _task(tid, "strikes")


def task_holder(tid: str) -> str:
    """String: the worker that started the task's latest delivery."""
    return _task(tid, "holder")


def task_keys(tid: str) -> tuple[str, str, str, str, str]:
    """Every key of a task's delivery bookkeeping."""
    return (
        task_attempts(tid),
        task_inflight(tid),
        task_partial(tid),
        task_strikes(tid),
        task_holder(tid),
    )


# ---- job store: indexes ----------------------------------------------------------------

# Sorted set: job id -> creation time (``imgq jobs``).
JOB_INDEX = PREFIX + "jobs"
# Sorted set: job id -> submit time, for jobs not known to be finished (the sweep).
OPEN_JOBS = PREFIX + "jobs:open"
# Sorted set: job id -> submit time, for jobs with a completion callback and no outcome
# yet (the workers' scan for callbacks nobody sends).
CALLBACKS_DUE = PREFIX + "callbacks:due"

# ---- job store: your own labels (``shared.heads``; no TTL) ---------------------------

# Set: the names of the heads that have at least one version.
HEADS = PREFIX + "heads"


def head_meta(name: str) -> str:
    """Hash: version -> JSON (base model, labels, dimension, training size, metrics,
    creation time)."""
    return f"{PREFIX}head:{name}:meta"


def head_weights(name: str) -> str:
    """Hash: version -> the head's weights and bias (NumPy ``.npz`` bytes)."""
    return f"{PREFIX}head:{name}:weights"


def head_seq(name: str) -> str:
    """String: the last version number given to ``name`` (never given again)."""
    return f"{PREFIX}head:{name}:seq"


# ---- broker: workers and recovery ------------------------------------------------------

# Hash: worker id -> JSON (name, host, pid, models, started, seen, ...).
WORKERS = PREFIX + "workers"
# Hash: delivery tag -> id of the worker that holds it.
HELD = PREFIX + "held"
# Strings: counters since Redis was set up.
TASKS_RECOVERED = PREFIX + "stats:tasks_recovered"
TASKS_RESENT = PREFIX + "stats:tasks_resent"
# List: the latest recoveries, newest first.
RECOVERIES = PREFIX + "recoveries"
# Strings with a short TTL: one reclaim pass at a time, fleet-wide, and at most one
# per heartbeat interval.
RECLAIM_LOCK = PREFIX + "lock:reclaim"
# String: the token of the sweeper whose pass runs (renewed during it, deleted at its
# end); and one with a TTL that keeps passes apart, fleet-wide.
SWEEP_LOCK = PREFIX + "lock:sweep"
SWEEP_PACE = PREFIX + "lock:sweep-pace"

_WORKER = PREFIX + "worker:"
_ALIVE = ":alive"


def worker_alive(worker_id: str) -> str:
    """String with a TTL: exists while the worker's heartbeat is renewed."""
    return f"{_WORKER}{worker_id}{_ALIVE}"


# For Lua scripts that build ``worker_alive`` keys themselves: prefix .. id .. suffix.
WORKER_ALIVE_PREFIX = _WORKER
WORKER_ALIVE_SUFFIX = _ALIVE

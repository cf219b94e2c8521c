"""The worker's side of the results store: reach it before consuming, write a chunk's
records into it, and say what the Celery result holds instead.

With ``IMGQ_RESULTS_URL=redis`` the records are the task's Celery result, as they
always were; with PostgreSQL they go into the results table and the Celery result
is a summary (``{"ok": N, "failed": M, "stored": "postgresql"}``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from celery import states
from celery.signals import celeryd_after_setup

from shared.contract import ResultDict
from shared.jobs import JobStore
from shared.results_store import (
    PostgresResultsStore,
    ResultsStore,
    ResultsStoreError,
    results_store_for,
)
from shared.settings import get_settings
from workers.app import app, job_store

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def results_store() -> ResultsStore:
    """This worker's results store (``IMGQ_RESULTS_URL``).

    A PostgreSQL write that fails is not retried inside the store: the task's own
    wait (``workers.store_health``) retries it, with the worker paused meanwhile."""
    store = results_store_for(get_settings().results_url, app.backend, job_store())
    if isinstance(store, PostgresResultsStore):
        store.patience_s = 0.0
    return store


def first_position(job_id: str, chunk: int, jobs: JobStore | None = None) -> int:
    """The job position of a chunk's first image (chunks are all ``chunk_size`` long).

    Read from the job record every time, not remembered: a job id deleted
    (``imgq delete``) and submitted again can come back with another chunk size."""
    return chunk * (jobs or job_store()).get(job_id).chunk_size


def store_records(job_id: str, model: str, chunk: int, records: Sequence[ResultDict]) -> Any:
    """Store a chunk's records; what the task returns (the records, or a summary)."""
    store = results_store()
    if not store.keeps_records:
        return list(records)
    store.write_chunk(job_id, model, first_position(job_id, chunk), records)
    failed = sum(1 for r in records if r.get("error"))
    return {"ok": len(records) - failed, "failed": failed, "stored": store.kind}


# STARTED, written only where the task has no outcome yet, in one step. Celery's own
# store_result reads the state and then writes it, so a delivery that read "no
# result" and wrote a moment later (a worker frozen in between, two deliveries at
# once) put STARTED over the result another delivery had stored meanwhile: the task
# counted as done and its records hidden, until the late delivery stored them again.
# ARGV: the STARTED value, its TTL (0: none), then Celery's outcome states.
_MARK_STARTED = """
local current = redis.call('GET', KEYS[1])
if current then
    local ok, meta = pcall(cjson.decode, current)
    if not ok or type(meta) ~= 'table' then
        return 0
    end
    for i = 3, #ARGV do
        if meta['status'] == ARGV[i] then
            return 0
        end
    end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
    redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


def mark_started(backend: Any, task_id: str, meta: dict[str, Any], request: Any = None) -> bool:
    """Record ``task_id`` as STARTED (with ``meta``) in a Redis result backend, unless it
    already has an outcome there (SUCCESS, FAILURE, REVOKED, or a value that is not
    Celery's JSON); whether it was written. Published as Celery publishes a state."""
    state = backend._get_result_meta(meta, states.STARTED, None, request)
    state["task_id"] = task_id
    key = backend.get_key_for_task(task_id)
    ttl = int(backend.expires or 0)
    outcomes = sorted(states.READY_STATES)  # SUCCESS, FAILURE, REVOKED
    value = backend.encode(state)
    return bool(backend.client.eval(_MARK_STARTED, 1, key, value, ttl, *outcomes))


def counts(retval: Any) -> tuple[int, int]:
    """(ok, failed) from a task's return value, records or summary."""
    if isinstance(retval, dict):
        return int(retval["ok"]), int(retval["failed"])
    failed = sum(1 for r in retval if r.get("error"))
    return len(retval) - failed, failed


@celeryd_after_setup.connect
def check_results_store(**_: Any) -> None:
    """Reach the results store (and create or migrate its schema) before consuming:
    a worker that cannot store results must not take tasks."""
    try:
        store = results_store()
        store.check()
    except ResultsStoreError as exc:
        log.critical("imgq worker cannot start: %s", exc)
        print(f"imgq worker cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    log.info("imgq results store: %s", store.kind)

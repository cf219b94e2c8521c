"""Where result records live, chosen by ``IMGQ_RESULTS_URL``: Redis or PostgreSQL.

- ``redis`` (the default): a task's records are its Celery result, in the result
  backend's Redis (``IMGQ_RESULT_BACKEND``, by default the broker's), expiring after
  ``IMGQ_RESULT_EXPIRES`` (``redis_store``).
- ``postgresql://...``: workers write a chunk's records into the ``imgq_results``
  table in one statement, idempotently (primary key: job, image position, model);
  the Celery result is a small summary. Rows stay until ``imgq delete`` (``postgres``).

Either way, *which tasks are finished* comes from the Redis job bookkeeping
(``shared.jobs``): status, waiting, resending and cancelling work the same.

The interface is :class:`ResultsStore` (``base``); :func:`results_store_for` picks
the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.contract import ResultDict, error_result
from shared.jobs import JobRecord, JobStore
from shared.results_store.base import (
    ResultsSchemaError,
    ResultsStore,
    ResultsStoreError,
    gc_paused,
)
from shared.results_store.postgres import (
    PG_FETCH_ROWS,
    PG_PATIENCE_S,
    PostgresResultsStore,
    explain_connect_error,
    redact_url,
)
from shared.results_store.redis_store import RedisResultsStore, TaskOutcome
from shared.schemas import ErrorCode, ImageRef

__all__ = [
    "PG_FETCH_ROWS",
    "PG_PATIENCE_S",
    "PostgresResultsStore",
    "RedisResultsStore",
    "ResultsSchemaError",
    "ResultsStore",
    "ResultsStoreError",
    "TaskOutcome",
    "delete_job_records",
    "explain_connect_error",
    "failed_chunk_records",
    "gc_paused",
    "redact_url",
    "results_store_for",
]


def results_store_for(results_url: str, backend: Any, jobs: JobStore) -> ResultsStore:
    """The store ``IMGQ_RESULTS_URL`` names; ResultsStoreError for anything else."""
    value = results_url.strip()
    if value.lower() in ("", "redis"):
        return RedisResultsStore(backend, jobs)
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ResultsStoreError(
                "IMGQ_RESULTS_URL names PostgreSQL but psycopg is not installed: "
                "pip install 'imgq[postgres]'"
            ) from None
        return PostgresResultsStore(value)
    raise ResultsStoreError(
        f"IMGQ_RESULTS_URL must be 'redis' or a postgresql:// URL, not {redact_url(value)!r}"
    )


def delete_job_records(jobs: JobStore, job: JobRecord) -> int:
    """Delete a job's Redis records (``JobStore.delete``); how many keys went."""
    return jobs.delete(job.job_id)


def failed_chunk_records(
    job_id: str, model: str, refs: Sequence[ImageRef], reason: str
) -> list[ResultDict]:
    """``task_failed`` records for every image of a chunk that failed for good."""
    message = f"the task failed after its retries: {reason}"
    return [error_result(job_id, ref.src, model, ErrorCode.TASK_FAILED, message) for ref in refs]

"""Records as Celery task results, in the result backend's Redis
(``IMGQ_RESULTS_URL=redis``, the default)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.contract import ResultDict, task_id
from shared.jobs import JobRecord, JobStore
from shared.results_store.base import ResultsStoreError, gc_paused
from shared.schemas import ErrorCode, ResultRecord, error_record

# Task results read (MGET) or deleted per round trip.
MGET_BATCH = 500


@dataclass(frozen=True)
class TaskOutcome:
    """What the result backend holds for one task: its state and, when ready, its records."""

    state: str
    records: list[ResultRecord] | None = None
    error: str | None = None


class _SuccessMeta(BaseModel):
    """A successful task's entry in the result backend (other keys ignored)."""

    status: Literal["SUCCESS"]
    result: list[ResultRecord]


# Parsed and validated in one pass from the stored JSON bytes (pydantic-core).
_SUCCESS = TypeAdapter(_SuccessMeta)


class RedisResultsStore:
    """Records as Celery task results in the result backend (today's behaviour)."""

    kind = "redis"

    def __init__(self, backend: Any, jobs: JobStore) -> None:
        self.backend = backend
        self.jobs = jobs

    @property
    def keeps_records(self) -> bool:
        """Workers return records as the task result; nothing is written here."""
        return False

    def check(self) -> None:
        """Nothing to prepare: the records go to the Celery result backend
        (``IMGQ_RESULT_BACKEND``, the broker's Redis unless set otherwise), which holds
        the job records too and is reached with them."""

    def write_chunk(
        self, job_id: str, model: str, first: int, records: Sequence[ResultDict]
    ) -> None:
        """Nothing to do: the records travel as the task's result."""

    def outcomes(self, task_ids: Sequence[str]) -> list[TaskOutcome]:
        """The result backend's state (and records) of each task, in order."""
        backend = self.backend
        out: list[TaskOutcome] = []
        with gc_paused():
            for start in range(0, len(task_ids), MGET_BATCH):
                batch = task_ids[start : start + MGET_BATCH]
                values = backend.mget([backend.get_key_for_task(t) for t in batch])
                out.extend(self._outcome(backend, value) for value in values)
        return out

    @staticmethod
    def _outcome(backend: Any, value: bytes | None) -> TaskOutcome:
        if value is None:
            return TaskOutcome(state="PENDING")
        try:
            ok = _SUCCESS.validate_json(value)
        except ValidationError:
            pass
        else:
            return TaskOutcome(state=ok.status, records=ok.result)
        meta = backend.decode_result(value)
        state = meta["status"]
        if state == "SUCCESS" and isinstance(meta["result"], dict):
            # A summary: the workers wrote the records to another store.
            raise ResultsStoreError(
                f"the workers stored this job's results in {meta['result'].get('stored')}: "
                "set IMGQ_RESULTS_URL to the workers' value"
            )
        if state == "SUCCESS":  # stored in a form the fast parse did not take
            return TaskOutcome(
                state=state, records=[ResultRecord.model_validate(r) for r in meta["result"]]
            )
        if state == "FAILURE":
            exc = meta.get("result")
            return TaskOutcome(state=state, error=f"{type(exc).__name__}: {exc}")
        return TaskOutcome(state=state)

    def iter_records(self, job: JobRecord) -> Iterator[ResultRecord]:
        """Records chunk by chunk and model by model, ``MGET_BATCH`` chunks at a time.

        A task that failed for good yields a ``task_failed`` record for each of its
        images, so a finished job has exactly one record per image and model.
        """
        models = job.models
        n = job.n_chunks
        for start in range(0, n, MGET_BATCH):
            stop = min(n, start + MGET_BATCH)
            ids = [task_id(job.job_id, m, i) for i in range(start, stop) for m in models]
            outcomes = iter(self.outcomes(ids))
            for index in range(start, stop):
                for model in models:
                    outcome = next(outcomes)
                    if outcome.records is not None:
                        yield from outcome.records
                    elif outcome.state == "FAILURE":
                        for ref in self.jobs.chunk(job.job_id, index):
                            yield error_record(
                                job.job_id,
                                ref.src,
                                model,
                                ErrorCode.TASK_FAILED,
                                f"the task failed after its retries: {outcome.error}",
                            )

    def delete_job(self, job: JobRecord) -> int:
        """Delete the job's task results from the result backend."""
        keys = [
            self.backend.get_key_for_task(task_id(job.job_id, m, i))
            for m in job.models
            for i in range(job.n_chunks)
        ]
        deleted = 0
        for start in range(0, len(keys), MGET_BATCH):
            deleted += int(self.jobs.client.delete(*keys[start : start + MGET_BATCH]))
        return deleted

    def close(self) -> None:
        """Nothing of its own to release (the Celery app owns the connections)."""

"""Celery tasks: thin wrappers that validate arguments, call the runtime, and keep
the job's bookkeeping. The logic lives in ``workers.runtime``."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from shared.celery_app import CLASSIFY_TASK
from shared.schemas import ErrorCode, ImageRef, ResultRecord, error_record
from workers.app import app, job_store
from workers.state import get_runtime

log = logging.getLogger(__name__)


def _count(records: list[dict[str, Any]]) -> tuple[int, int]:
    failed = sum(1 for r in records if r.get("error"))
    return len(records) - failed, failed


class ClassifyTask(Task):
    """Records each finished chunk in the job's bookkeeping, after its result is stored."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Count the chunk's results (runs after the result backend has them)."""
        ok, failed = _count(retval)
        job_store().mark_finished(task_id, ok=ok, failed=failed)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """A chunk that failed for good counts all its images as failed."""
        images = kwargs.get("images") or (args[3] if len(args) > 3 else [])
        try:
            job_store().mark_finished(task_id, ok=0, failed=len(images))
        except Exception:
            log.exception("could not record the failure of task %s", task_id)


@app.task(
    name=CLASSIFY_TASK,
    base=ClassifyTask,
    bind=True,
    # Unexpected errors (not per-image ones, which become error records) are
    # retried with exponential backoff, then the chunk fails as a whole.
    autoretry_for=(Exception,),
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=3,
)
def classify(
    self: Task, job_id: str, model: str, chunk: int, images: list[list[str]]
) -> list[dict[str, Any]]:
    """Classify one chunk of images with one model; one result record per image."""
    refs = [ImageRef(src=src, ref=ref) for src, ref in images]
    try:
        runtime = get_runtime()
    except RuntimeError as exc:
        records: list[ResultRecord] = [
            error_record(job_id, r.src, model, ErrorCode.UNKNOWN_MODEL, str(exc)) for r in refs
        ]
    else:
        records = runtime.classify(job_id, model, refs)
    log.info(
        "job %s model %s chunk %d: %d images, %d errors",
        job_id,
        model,
        chunk,
        len(records),
        sum(1 for r in records if r.error),
    )
    return [r.to_json_dict() for r in records]

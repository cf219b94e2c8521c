"""Celery tasks: thin wrappers that validate arguments, call the runtime, and keep
the job's bookkeeping. The logic lives in ``workers.runtime``."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from functools import lru_cache, partial
from typing import Any, TypeVar

from celery import Task, states
from celery.exceptions import Ignore

from shared.celery_app import CLASSIFY_TASK, attempt_store_for
from shared.contract import ClassifyMessage, ResultDict, error_result, parse_task_id
from shared.jobs import AttemptStore, JobError
from shared.notify import notify_if_ended
from shared.schemas import ErrorCode, ImageRef
from workers import metrics
from workers.app import app, job_store
from workers.batcher import Skipped
from workers.cancel import CancelWatch, drop_task
from workers.liveness import current_worker_id, is_alive
from workers.results import counts, mark_started, results_store, store_records
from workers.state import get_runtime
from workers.store_health import store_gate, unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Process deaths with the same image in flight after which that image is skipped.
STRIKES_TO_SKIP = 2


class InvalidTask(ValueError):
    """The message does not have the shape imgq sends; retrying cannot help."""


@lru_cache(maxsize=1)
def attempt_store() -> AttemptStore:
    """This worker's view of per-task delivery counts."""
    return attempt_store_for(app)


@lru_cache(maxsize=1)
def cancel_watch() -> CancelWatch:
    """This worker's view of which jobs are cancelled."""
    return CancelWatch(job_store())


def patiently(action: Callable[[], T], what: str) -> T:
    """Run a write; while its store refuses it (Redis full or away, PostgreSQL down or
    full) the worker pauses and tries again until it goes through
    (``workers.store_health``): a store failure is never an image failure."""
    return store_gate().write(action, what)


def parse_message(job_id: Any, model: Any, chunk: Any, images: Any = None) -> ClassifyMessage:
    """The task message from its arguments; InvalidTask when it is malformed."""
    try:
        return ClassifyMessage.from_args(job_id, model, chunk, images)
    except ValueError as exc:
        raise InvalidTask(str(exc)) from exc


class ClassifyTask(Task):
    """Records each finished chunk in the job's bookkeeping, after its result is stored."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Count the chunk's results (runs after the results store has them; waits
        while Redis refuses the write, so a stored chunk is always counted)."""
        ok, failed = counts(retval)
        patiently(
            lambda: job_store().mark_finished(task_id, ok=ok, failed=failed),
            f"recording task {task_id}",
        )
        _notify_if_ended(task_id)
        if results_store().kind == "postgresql":  # vectors live there only
            from shared.settings import get_settings
            from workers.indexing import index_if_ended

            index_if_ended(job_store(), get_runtime(), get_settings().results_url, task_id)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """A chunk that failed for good counts all its images as failed; a chunk whose
        failure was a store refusing writes is not (nothing is known of its images):
        it is left for the sweep to send again."""
        refused = unavailable(exc)
        if refused is not None:
            log.error(
                "task %s not run to its end: %s; its images get no record now, and the "
                "sweep sends it again once the job stalls",
                task_id,
                refused[1],
            )
            return
        try:
            job_id, _, index = parse_task_id(task_id)
            n = len(job_store().chunk(job_id, index))
        except Exception:
            images = kwargs.get("images") or (args[3] if len(args) > 3 else [])
            n = len(images) if isinstance(images, list) else 0
        try:
            if results_store().keeps_records:
                # The store holds the records: the failure must land there first, or
                # the chunk stays unfinished (a waiting producer sends it again).
                _store_failed_chunk(task_id, exc)
        except Exception:
            log.exception("could not store the failure of task %s", task_id)
            return
        try:
            patiently(
                lambda: job_store().mark_finished(task_id, ok=0, failed=n),
                f"recording failed task {task_id}",
            )
        except Exception:
            log.exception("could not record the failure of task %s", task_id)
            return
        _notify_if_ended(task_id)


def _notify_if_ended(tid: str) -> None:
    """Send the job's completion callback when this task was its last (never raises)."""
    try:
        notify_if_ended(job_store(), parse_task_id(tid)[0])
    except Exception:
        log.exception("could not send the completion callback after task %s", tid)


@app.task(
    name=CLASSIFY_TASK,
    base=ClassifyTask,
    bind=True,
    # Unexpected errors (per-image ones become error records) are retried with
    # exponential backoff, a bounded number of times; then the chunk fails as a
    # whole and its images get task_failed records. A malformed message is not
    # retried. A store that refuses writes is no such error: the task waits for it
    # (patiently), its results kept in memory.
    autoretry_for=(Exception,),
    dont_autoretry_for=(InvalidTask,),
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=3,
    # The task stores its own result (store_result), so that a refused write waits
    # instead of failing the task; STARTED is written by it too, best effort.
    track_started=False,
)
def classify(
    self: Task, job_id: str, model: str, chunk: int, images: list[str | list[str]] | None = None
) -> list[ResultDict] | dict[str, Any]:
    """Classify one chunk of images with one model; one result record per image, returned
    (Redis results store) or written to the results store with a summary returned.

    The images are read from the job record (``images`` is given only by messages of
    the older form, which carried them inline)."""
    message = parse_message(job_id, model, chunk, images)
    # First of all: a task of a cancelled job is not run (no decoding, no model).
    watch = cancel_watch()
    if watch.is_cancelled(message.job_id, fresh=True):
        drop_task(self, message.job_id)
    tid = self.request.id
    # A duplicate delivery (a frozen worker, a broker reconnect, a failover, two
    # sweeps) of a task already finished: its result is stored and counted.
    if _finished(tid):
        log.info("task %s has already finished: this delivery is acknowledged, not run", tid)
        metrics.record_duplicate(model)
        raise Ignore()
    _mark_started(self)
    refs = list(message.images) if message.images is not None else _chunk_images(self, message)
    runtime = get_runtime()
    me = current_worker_id()
    deliveries, before = patiently(
        lambda: attempt_store().begin_held(tid, me or "?"), f"counting task {tid}"
    )
    # A delivery after one whose worker process died with this task (deliveries
    # beyond the retries Celery made, the worker of the one before dead): isolate
    # the images one by one. A duplicate while that worker lives is no crash.
    crashes = deliveries - 1 - (self.request.retries or 0)
    if crashes > 0 and before is not None and (before == me or is_alive(before) is True):
        crashes = 0
    if crashes <= 0:
        try:
            records = runtime.classify(job_id, model, refs, skip=lambda: watch.is_cancelled(job_id))
        except Skipped:  # cancelled while its images waited for the model
            drop_task(self, job_id)
    else:
        records = _classify_isolated(tid, job_id, model, refs, runtime_classify=runtime.classify)
    metrics.record_task(model, records, redelivered=crashes > 0)
    log.info(
        "job %s model %s chunk %d: %d images, %d errors%s",
        job_id,
        model,
        chunk,
        len(records),
        sum(1 for r in records if r.get("error")),
        f" (delivery {deliveries}, images one by one)" if crashes > 0 else "",
    )
    return _store(self, job_id, model, chunk, records)


def _finished(tid: str) -> bool:
    """True when the task is recorded as finished; False when Redis cannot say."""
    try:
        return job_store().is_finished(tid)
    except Exception as exc:
        log.warning("task %s: cannot read whether it has finished (%s); running it", tid, exc)
        return False


def _mark_started(task: Task) -> bool:
    """STARTED in the result backend, for monitors, unless another delivery already
    stored the task's outcome; whether it was written. Best effort: the task runs
    anyway."""
    tid = task.request.id
    meta = {"pid": os.getpid(), "hostname": task.request.hostname or socket.gethostname()}
    try:
        return mark_started(task.backend, tid, meta, task.request)
    except Exception as exc:
        log.debug("task %s: could not record it as started (%s)", tid, exc)
        return False


def _store(task: Task, job_id: str, model: str, chunk: int, records: list[ResultDict]) -> Any:
    """Store the chunk's records and the task's result, waiting (paused) while a store
    refuses the writes; what the task returns. The result is written here, not by
    Celery after the task returns, so that a refused write cannot fail the task."""
    tid = task.request.id
    retval = patiently(
        lambda: store_records(job_id, model, chunk, records), f"storing the results of {tid}"
    )
    patiently(
        lambda: task.backend.store_result(tid, retval, states.SUCCESS, request=task.request),
        f"storing the result of {tid}",
    )
    task.request.ignore_result = True  # stored: Celery does not write it again
    return retval


def _chunk_images(task: Task, message: ClassifyMessage) -> list[ImageRef]:
    """The images of the message's chunk, from the job record. A job whose record is
    gone (deleted with ``imgq delete``, or expired) has nothing left to classify: its
    task is dropped like a cancelled job's."""
    try:
        return patiently(
            lambda: job_store().chunk(message.job_id, message.chunk),
            f"reading chunk {message.chunk} of job {message.job_id}",
        )
    except JobError as exc:
        log.warning("task %s: %s", task.request.id, exc)
        drop_task(task, message.job_id, state="gone")


def _store_failed_chunk(tid: str, exc: BaseException) -> None:
    """``task_failed`` rows for every image of a chunk that failed for good."""
    from shared.results_store import failed_chunk_records

    job_id, model, chunk = parse_task_id(tid)
    refs = job_store().chunk(job_id, chunk)
    store_records(
        job_id,
        model,
        chunk,
        failed_chunk_records(job_id, model, refs, f"{type(exc).__name__}: {exc}"),
    )


def _classify_isolated(
    tid: str,
    job_id: str,
    model: str,
    refs: list[ImageRef],
    *,
    runtime_classify: Callable[..., list[ResultDict]],
) -> list[ResultDict]:
    """One image at a time, each recorded before the next: an image that was being
    worked on when a process died twice is not tried again but gets ``worker_crashed``.

    Twice, not once: a worker killed from outside (preemption, an OOM kill, a scale
    down) looks the same as one killed by its input, and one such death must not
    cost an image its result.
    """
    store = attempt_store()
    done = store.partial(tid)
    crashed = store.inflight(tid)
    records: list[ResultDict] = []
    for i, ref in enumerate(refs):
        record = done.get(i)
        if record is None:
            strikes = 0
            if i == crashed:
                strikes = patiently(partial(store.strike, tid, i), f"counting a crash of {tid}")
            if strikes >= STRIKES_TO_SKIP:
                log.error(
                    "task %s: %s was being classified when a worker died, twice; skipped",
                    tid,
                    ref.src,
                )
                record = error_result(
                    job_id,
                    ref.src,
                    model,
                    ErrorCode.WORKER_CRASHED,
                    "a worker process died while classifying this image, twice; it is not tried "
                    "again so that the job can finish (see the worker logs)",
                )
            else:
                patiently(partial(store.set_inflight, tid, i), f"recording the image of {tid}")
                record = runtime_classify(job_id, model, [ref])[0]
            patiently(partial(store.save_partial, tid, i, record), f"keeping a record of {tid}")
        records.append(record)
    return records

"""The producer's Python API: submit sources to models, follow a job, fetch its results.

    from producer import Client
    client = Client()
    job = client.submit(["./photos"], models=["resnet50"])
    job.wait()
    for record in job.iter_results():
        print(record.image, record.top5[0].label if record.ok else record.error)

Tasks are sent by name; nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import redis
from celery import Celery

from producer.sources import expand_sources
from shared import open_jobs
from shared.celery_app import CLASSIFY_TASK, create_app, job_store_for
from shared.contract import ClassifyMessage, task_id
from shared.jobctl import CancelOutcome, JobState, JobSummary, cancel_job, check_name, list_jobs
from shared.jobs import JobRecord, JobStatus, JobStore, check_job_id, new_job_id
from shared.liveness import BROKER_ERRORS, BrokerRedis, Reclaimer
from shared.notify import check_notify_url, notify_if_ended, notify_job_end
from shared.priority import DEFAULT_PRIORITY, check_priority, transport_priority
from shared.registry import ModelSpec, get_model, load_registry, queue_for
from shared.results_store import ResultsStore, gc_paused, results_store_for
from shared.schemas import ImageRef, ResultRecord
from shared.settings import Settings, get_settings

# Errors of a Redis that is away for a while (a restart, a failover): waits go on.
REDIS_AWAY = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)
MIN_REFRESH_S = 0.05
log = logging.getLogger(__name__)


class JobTimeout(TimeoutError):
    """``wait`` ran out of time before the job finished."""


class JobCancelledError(RuntimeError):
    """The job was cancelled: ``wait`` stops, its missing images will never come."""


class Client:
    """Talks to the broker and the result backend named by the settings."""

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or get_settings()
        self.app = app or create_app(self.settings)
        self._store: JobStore | None = None
        self._results: ResultsStore | None = None

    @property
    def store(self) -> JobStore:
        """The job records in Redis."""
        if self._store is None:
            self._store = job_store_for(self.app)
        return self._store

    @property
    def results_store(self) -> ResultsStore:
        """Where the result records are (``IMGQ_RESULTS_URL``: Redis or PostgreSQL)."""
        if self._results is None:
            self._results = results_store_for(
                self.settings.results_url, self.app.backend, self.store
            )
        return self._results

    def registry(self) -> dict[str, ModelSpec]:
        """The models known to this producer (built-ins and IMGQ_MODELS_FILE)."""
        return load_registry(self.settings.models_file)

    def submit(
        self,
        sources: Sequence[str | ImageRef],
        *,
        models: Sequence[str],
        job_id: str | None = None,
        chunk_size: int | None = None,
        name: str = "",
        priority: int = DEFAULT_PRIORITY,
        notify: str | None = None,
    ) -> Job:
        """Record a job and queue one task per chunk and model; the job's handle.

        ``notify``: a URL that gets one JSON POST when the job ends (``shared.notify``).

        ``sources`` are expanded like the command line's (files, folders, globs,
        manifests, URLs); ImageRef items are taken as they are. ``name`` is shown
        wherever the job is (status, jobs, report, Flower); ``priority`` 0-9, higher
        first: a worker takes the next task of the most urgent job it serves.
        """
        if not models:
            raise ValueError("name at least one model")
        check_name(name)
        check_priority(priority)
        if notify is not None:
            check_notify_url(notify, allow_private=self.settings.allow_private_urls)
        registry = self.registry()
        models = list(dict.fromkeys(models))
        for model in models:
            get_model(registry, model)
        refs: list[ImageRef] = []
        strings: list[str] = []
        for source in sources:
            if isinstance(source, ImageRef):
                refs.extend(expand_sources(strings))
                strings = []
                refs.append(source)
            else:
                strings.append(source)
        refs.extend(expand_sources(strings))
        if not refs:
            raise ValueError("no images to submit")
        # A results store that cannot take the records fails the submit, not the job.
        self.results_store.check()
        size = chunk_size or self.settings.chunk_size
        chunks = [refs[i : i + size] for i in range(0, len(refs), size)]
        jid = check_job_id(job_id) if job_id else new_job_id()
        record = self.store.create(
            jid, models, chunks, chunk_size=size, name=name, priority=priority, notify=notify
        )
        open_jobs.track(self.store.client, jid)  # swept for lost tasks until it finishes
        job = Job(self, record)
        for index in range(record.n_chunks):
            for model in models:
                job.send_chunk(model, index)
        return job

    def job(self, job_id: str) -> Job:
        """A handle on an existing job (a JobError when it is unknown or expired)."""
        return Job(self, self.store.get(job_id))

    def jobs(self, *, limit: int = 20, states: set[JobState] | None = None) -> list[JobSummary]:
        """Recent jobs, newest first, with their counts (only those in ``states`` if given)."""
        return list_jobs(self.store, limit=limit, states=states)

    def cancel(self, job_id: str) -> CancelOutcome:
        """Cancel a job (see :meth:`Job.cancel`); its completion callback says so."""
        outcome = cancel_job(self.store, job_id)
        if not outcome.already:
            try:
                notify_job_end(self.store, job_id, "cancelled", self.settings)
            except Exception:  # the cancel holds whether or not the callback goes out
                log.exception("job %s: could not send its completion callback", job_id)
        return outcome


class Job:
    """A submitted job: its status, a wait with progress, its results."""

    def __init__(self, client: Client, record: JobRecord) -> None:
        self.client = client
        self.record = record

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.record.job_id

    def send_chunk(self, model: str, index: int) -> str:
        """Queue one chunk for one model; the task id (the same every time it is sent).

        The message names the chunk; the worker reads its images from the job record."""
        message = ClassifyMessage(
            job_id=self.job_id, model=model, chunk=index, size=self.record.chunk_len(index)
        )
        self.client.app.send_task(
            CLASSIFY_TASK,
            args=message.to_args(),
            task_id=message.task_id,
            queue=queue_for(model),
            priority=transport_priority(self.record.priority),
            # What Flower shows (and searches): the job, its name, model and size,
            # not hundreds of paths.
            argsrepr=message.argsrepr(name=self.record.name),
            kwargsrepr="{}",
        )
        return message.task_id

    def resend_unfinished(self) -> int:
        """Queue again every task without a result (resume after an interruption); how many.

        Task ids are fixed, so a task that was still queued and now runs twice
        writes the same result and counts once. A cancelled job is not resent.
        """
        if self.client.store.is_cancelled(self.job_id):
            return 0
        finished = set(self.client.store.finished_tasks(self.job_id))
        sent = 0
        for index in range(self.record.n_chunks):
            for model in self.record.models:
                if task_id(self.job_id, model, index) not in finished:
                    self.send_chunk(model, index)
                    sent += 1
        return sent

    def status(self) -> JobStatus:
        """Per-model counts: total, done, failed, pending."""
        return self.client.store.status(self.job_id)

    def cancel(self) -> CancelOutcome:
        """Cancel the job: none of its tasks starts from now on (a batch already in a
        model finishes), its waiting tasks leave the queues, its results so far stay.
        A JobError (JobFinishedError) when it has already finished."""
        return self.client.cancel(self.job_id)

    def wait(
        self,
        *,
        progress: bool = True,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        check: Callable[[], None] | None = None,
    ) -> JobStatus:
        """Block until every task finished; a progress bar on stderr when ``progress``.

        JobCancelledError when the job is (or gets) cancelled, JobTimeout after
        ``timeout`` seconds.

        ``check`` is called at every poll and may raise to stop waiting (for
        example when the worker the caller started has died).
        """
        from tqdm import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        # Redis hands an abandoned task to another worker after the visibility
        # timeout; a task still without a result well after that was lost on the
        # way (a worker killed between taking a message and recording it as taken,
        # a window in the Redis transport). Send those again: their ids are fixed,
        # so a rerun cannot double a result.
        visibility = self.client.settings.visibility_timeout
        stall_limit = visibility + min(30.0, float(visibility))
        last_progress = time.monotonic()
        # A worker that dies holding tasks of this job: put them back at once.
        reclaimer = Reclaimer(
            BrokerRedis(self.client.app),
            timeout=self.client.settings.heartbeat_timeout,
            by=f"producer {self.job_id}",
        )
        last_reclaim = 0.0
        # Subscribe before the first read, so no notification falls in between.
        listener = self.client.store.listen(self.job_id)
        status = self._first_status(deadline)
        bar = tqdm(
            total=status.images_total,
            unit="img",
            desc=f"job {self.job_id}",
            disable=not progress,
            dynamic_ncols=True,
        )
        last_read = time.monotonic()
        try:
            while True:
                bar.n = status.images_finished
                failed = sum(c.failed for c in status.models.values())
                bar.set_postfix(failed=failed, refresh=False)
                bar.refresh()
                if status.cancelled:
                    raise JobCancelledError(
                        f"job {self.job_id} was cancelled: {status.images_finished}/"
                        f"{status.images_total} image results, the rest never classified"
                    )
                if status.finished:
                    _notify_quietly(self.client.store, self.job_id, self.client.settings)
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise JobTimeout(
                        f"job {self.job_id} not finished after {timeout:g} s "
                        f"({status.images_finished}/{status.images_total} image results)"
                    )
                # Woken as soon as a task finishes, at most MIN_REFRESH_S apart (a
                # big job finishes thousands of tasks a second); polled anyway
                # every poll_interval.
                since = time.monotonic() - last_read
                if since < MIN_REFRESH_S:
                    time.sleep(MIN_REFRESH_S - since)
                listener.wait(poll_interval)
                if check is not None:
                    check()
                last_read = time.monotonic()
                if last_read - last_reclaim >= self.client.settings.heartbeat_interval:
                    last_reclaim = last_read
                    self._reclaim(reclaimer)
                before = status.images_finished
                status = self._status_patiently(status, deadline)
                if status.images_finished != before:
                    last_progress = last_read
                elif last_read - last_progress > stall_limit and not status.finished:
                    sent = self.resend_unfinished()
                    log.warning(
                        "job %s: no progress for %.0f s; %d unfinished task(s) sent again",
                        self.job_id,
                        last_read - last_progress,
                        sent,
                    )
                    last_progress = last_read
        finally:
            reclaimer.broker.close()
            listener.close()
            bar.close()

    def _reclaim(self, reclaimer: Reclaimer) -> None:
        """Put dead workers' tasks back on their queues; Redis away only delays it."""
        try:
            reclaimer.run(lock_s=self.client.settings.heartbeat_interval)
        except BROKER_ERRORS as exc:
            log.debug("job %s: recovery pass skipped: %s", self.job_id, exc)
            reclaimer.broker.close()

    def _first_status(self, deadline: float | None) -> JobStatus:
        """The job's status, retried for a while when Redis is away (a restart, or a
        failover that Sentinel has not finished announcing)."""
        give_up = time.monotonic() + 120.0
        while True:
            try:
                return self.status()
            except REDIS_AWAY as exc:
                now = time.monotonic()
                if now > give_up or (deadline is not None and now > deadline):
                    raise
                log.warning("job %s: Redis unreachable (%s); still waiting", self.job_id, exc)
                time.sleep(0.5)

    def _status_patiently(self, last: JobStatus, deadline: float | None) -> JobStatus:
        """The job's status; while Redis is unreachable (a restart), the last one seen."""
        try:
            return self.status()
        except REDIS_AWAY as exc:
            if deadline is not None and time.monotonic() > deadline:
                raise
            log.warning("job %s: Redis unreachable (%s); still waiting", self.job_id, exc)
            return last

    def iter_results(self) -> Iterator[ResultRecord]:
        """Result records of every finished task, in submission order, read from the
        results store in bounded batches.

        A task that failed for good yields a ``task_failed`` record for each of its
        images, so a finished job has exactly one record per image and model.
        """
        return self.client.results_store.iter_records(self.record)

    def results(self) -> list[ResultRecord]:
        """All result records available now (see :meth:`iter_results`)."""
        with gc_paused():
            return list(self.iter_results())


def _notify_quietly(store: JobStore, job_id: str, settings: Settings) -> None:
    """Send the job's completion callback if no worker has; never fails the wait."""
    try:
        notify_if_ended(store, job_id, settings)
    except Exception:
        log.exception("job %s: could not send its completion callback", job_id)

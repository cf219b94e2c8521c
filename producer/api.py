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
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery

from producer.listing import submit_streaming
from producer.sources import iter_sources
from shared.celery_app import CLASSIFY_TASK, create_app, job_store_for
from shared.contract import ClassifyMessage, task_id
from shared.defaults import bounds_of
from shared.heads import HeadError, HeadStore
from shared.jobctl import (
    MAX_NAME_LENGTH,
    CancelOutcome,
    JobState,
    JobSummary,
    cancel_job,
    check_name,
    list_jobs,
)
from shared.jobs import JobError, JobRecord, JobStatus, JobStore, check_job_id, new_job_id
from shared.liveness import (
    BROKER_ERRORS,
    RECOVERED_KEY,
    RESENT_KEY,
    BrokerRedis,
    Liveness,
    Reclaimer,
    WorkerInfo,
)
from shared.notify import (
    callback_status,
    check_notify_url,
    notify_if_ended,
    notify_job_end,
)
from shared.priority import DEFAULT_PRIORITY, check_priority, transport_priority
from shared.registry import ModelSpec, RegistryError, get_model, load_registry
from shared.results_store import (
    PostgresResultsStore,
    RedisResultsStore,
    ResultsStore,
    ResultsStoreError,
    delete_job_records,
    gc_paused,
    results_store_for,
)
from shared.schemas import ImageRef, ResultRecord
from shared.settings import Settings, get_settings

if TYPE_CHECKING:
    import numpy as np

    from shared.vectors import DuplicateGroup, Neighbor, VectorStore

# Errors of a Redis that is away for a while (a restart, a failover): waits go on.
REDIS_AWAY = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)
MIN_REFRESH_S = 0.05
log = logging.getLogger(__name__)


def check_chunk_size(chunk_size: int) -> int:
    """The chunk size, or a ValueError when it is outside what IMGQ_CHUNK_SIZE allows."""
    low, high = bounds_of("chunk_size")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ValueError(f"chunk_size must be a whole number, not {chunk_size!r}")
    if (low is not None and chunk_size < low) or (high is not None and chunk_size > high):
        raise ValueError(f"chunk_size {chunk_size} is not in {low}-{high} (as IMGQ_CHUNK_SIZE)")
    return chunk_size


class RedisFullError(RuntimeError):
    """Redis is at ``maxmemory`` and refuses writes: a submit is refused whole."""


def redis_full(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is Redis refusing a write at maxmemory."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in str(
            err
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


class JobTimeout(TimeoutError):
    """``wait`` ran out of time before the job finished."""


class JobCancelledError(RuntimeError):
    """The job was cancelled: ``wait`` stops, its missing images will never come."""


@dataclass(frozen=True)
class Deleted:
    """What :meth:`Client.delete` removed."""

    job_id: str
    results: int  # result records (PostgreSQL rows or Redis task results)
    keys: int  # Redis keys of the job's records
    store: str  # the results store's kind: redis or postgresql


@dataclass(frozen=True)
class WorkersListing:
    """Workers with a heartbeat (alive or dead) and what was recovered from dead ones."""

    workers: list[WorkerInfo]
    tasks_recovered: int  # put back on their queues from dead workers
    tasks_resent: int  # sent again by the sweep for lost tasks
    recoveries: list[dict[str, Any]]  # the latest recoveries, newest first


class EmbeddingsNeedPostgres(ValueError):
    """An embedding model's job with the Redis results store (one line: what to set)."""


def embeddings_need_postgres(model: str) -> EmbeddingsNeedPostgres:
    """The refusal of an embedding job without the PostgreSQL results store."""
    return EmbeddingsNeedPostgres(
        f"model {model!r} is an embedding model: its vectors are kept in PostgreSQL "
        "(pgvector), never in Redis; set IMGQ_RESULTS_URL=postgresql://USER:PASSWORD@HOST/DB, "
        "or use imgq run, which starts an embedded one"
    )


class Client:
    """Talks to the broker and the result backend named by the settings."""

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or get_settings()
        self.app = app or create_app(self.settings)
        self._store: JobStore | None = None
        self._broker: BrokerRedis | None = None
        self._results: ResultsStore | None = None
        self._vectors: VectorStore | None = None

    @property
    def store(self) -> JobStore:
        """The job records in Redis."""
        if self._store is None:
            self._store = job_store_for(self.app)
        return self._store

    @property
    def broker(self) -> BrokerRedis:
        """The broker's Redis (the queues), which need not be the job records' Redis."""
        if self._broker is None:
            self._broker = BrokerRedis(self.app)
        return self._broker

    @property
    def results_store(self) -> ResultsStore:
        """Where the result records are (``IMGQ_RESULTS_URL``: Redis or PostgreSQL)."""
        if self._results is None:
            self._results = results_store_for(
                self.settings.results_url, self.app.backend, self.store
            )
        return self._results

    def results_store_of(self, record: JobRecord) -> ResultsStore:
        """The store a job's results are in: the one it was submitted with (its record
        says which). A job whose results went to Redis is read there whatever
        IMGQ_RESULTS_URL says now; one whose results went to PostgreSQL needs
        IMGQ_RESULTS_URL to name it (its URL is not recorded): a ResultsStoreError."""
        store = self.results_store
        kind = record.results_store
        if not kind or kind == store.kind:
            return store
        if kind == "redis":
            return RedisResultsStore(self.app.backend, self.store)
        raise ResultsStoreError(
            f"job {record.job_id} keeps its results in {kind}, but IMGQ_RESULTS_URL names "
            f"{store.kind}: set IMGQ_RESULTS_URL to the {kind} URL its workers write to"
        )

    def vector_store(self, model: str = "") -> VectorStore:
        """Where embedding models' vectors are: the PostgreSQL results store's database.

        EmbeddingsNeedPostgres (naming ``model``) with the Redis results store.
        """
        if self.results_store.kind != "postgresql":
            raise embeddings_need_postgres(model or "an embedding model")
        if self._vectors is None:
            from shared.vectors import VectorStore

            self._vectors = VectorStore(self.settings.results_url)
        return self._vectors

    def registry(self) -> dict[str, ModelSpec]:
        """The models known to this producer (built-ins and IMGQ_MODELS_FILE)."""
        return load_registry(self.settings.models_file)

    def submit(
        self,
        sources: Iterable[str | ImageRef],
        *,
        models: Sequence[str],
        job_id: str | None = None,
        chunk_size: int | None = None,
        name: str = "",
        priority: int = DEFAULT_PRIORITY,
        notify: str | None = None,
    ) -> Job:
        """Record a job and queue one task per chunk and model; the job's handle, once
        every source has been listed.

        ``notify``: a URL that gets one JSON POST when the job ends (``shared.notify``).

        ``sources`` are expanded like the command line's (files, folders, globs,
        manifests, URLs); ImageRef items are taken as they are. Any iterable will do,
        a generator too: sources are listed, recorded and queued in bounded batches
        (``producer.listing``), so memory does not grow with the job, and workers
        start on the first chunks while the listing goes on (the job's state is
        "listing" until its totals are known). A source that fails part-way (a
        SourceError) leaves the job failed and cancelled, and is raised. ``name`` is shown
        wherever the job is (status, jobs, report, Flower); ``priority`` 0-9, higher
        first: a worker takes the next task of the most urgent job it serves.
        """
        if not models:
            raise ValueError("name at least one model")
        check_name(name)
        check_priority(priority)
        if chunk_size is not None:
            check_chunk_size(chunk_size)
        if notify is not None:
            check_notify_url(notify, allow_private=self.settings.allow_private_urls)
        registry = self.registry()
        models, routes = self.resolve_models(models)
        embedding = [m for m in models if m not in routes and get_model(registry, m).is_embedding]
        if embedding:
            # Refused here, before anything is queued: vectors never go to Redis.
            self.vector_store(embedding[0]).check()
        # A results store that cannot take the records fails the submit, not the job.
        self.results_store.check()
        size = self.settings.chunk_size if chunk_size is None else check_chunk_size(chunk_size)
        jid = check_job_id(job_id) if job_id else new_job_id()
        return submit_streaming(
            self,
            iter_sources(sources),
            models=models,
            job_id=jid,
            chunk_size=size,
            name=name,
            priority=priority,
            notify=notify,
            routes=routes,
        )

    @property
    def heads(self) -> HeadStore:
        """Your own labels: the heads trained with ``imgq train`` (``shared.heads``)."""
        return HeadStore(self.store.client)

    def resolve_models(self, models: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """The models as a job records them, without repeats, and the routes of those
        that are heads of your own labels. A registry model stays as named; a head's
        name becomes its pinned version (``dogs`` -> ``dogs@3``, the latest now), routed
        to its base model's queue. RegistryError naming both kinds when a name is
        neither."""
        registry = self.registry()
        out: list[str] = []
        routes: dict[str, str] = {}
        for model in dict.fromkeys(models):
            if model in registry:
                out.append(model)
                continue
            try:
                info = self.heads.info(model)
            except HeadError as exc:
                if "@" in model:
                    raise RegistryError(str(exc)) from None
                try:
                    get_model(registry, model)  # the registry's message, with its names
                except RegistryError as missing:
                    raise RegistryError(
                        f"{missing}; nor is it a model trained with imgq train (imgq models "
                        "lists them)"
                    ) from None
                raise
            if info.base not in registry:
                raise RegistryError(
                    f"model {info.ref} was trained on {info.base!r}, which this producer's "
                    "models file does not name"
                )
            if info.ref not in out:
                out.append(info.ref)
            routes[info.ref] = info.base
        return out, routes

    def refused_error(self, job_id: str, exc: BaseException) -> BaseException:
        """The error a submit that Redis refused raises: RedisFullError (one line saying
        what to do) when Redis is at maxmemory, else ``exc`` itself."""
        if not redis_full(exc):
            return exc
        from kombu.utils.url import maybe_sanitize_url

        return RedisFullError(
            f"Redis at {maybe_sanitize_url(self.settings.broker_url)} is full (it reached its "
            f"maxmemory and refuses writes): job {job_id} was not submitted and nothing of it "
            "was kept; free memory (imgq delete the jobs you no longer need), raise Redis' "
            "maxmemory, or keep results in PostgreSQL (IMGQ_RESULTS_URL=postgresql://...)"
        )

    def withdraw(self, record: JobRecord) -> None:
        """Take back a job whose submit failed half-way: its queued tasks, its records."""
        from shared.jobctl import purge_queued
        from shared.results_store import delete_job_records

        try:
            # Deletes take no memory: Redis allows them even when full.
            purge_queued(self.broker.client, record)
            delete_job_records(self.store, record)
        except Exception:
            log.exception("job %s: could not withdraw what was submitted of it", record.job_id)

    def embed(self, image: str, *, model: str, timeout: float | None = 300) -> np.ndarray:
        """The vector of one image file or URL, embedded through the queue by a worker
        of ``model`` (a job of one image, deleted afterwards)."""
        label = "".join(c if c.isprintable() else "?" for c in Path(image).name)
        job = self.submit([image], models=[model], name=f"query {label}"[:MAX_NAME_LENGTH])
        try:
            job.wait(timeout=timeout, progress=False)
            record = next(iter(job.iter_results()), None)
            if record is not None and record.error is not None:
                raise ValueError(f"{image}: {record.error.code.value}: {record.error.message}")
            vectors = self.vector_store(model)
            _, vector = vectors.vector_of(job.job_id, model, 0)
            return vector
        finally:
            self.delete(job.job_id)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job (a JobError when it is unknown or expired)."""
        return Job(self, self.store.get(job_id))

    def jobs(self, *, limit: int = 20, states: set[JobState] | None = None) -> list[JobSummary]:
        """Recent jobs, newest first, with their counts (only those in ``states`` if given)."""
        return list_jobs(self.store, limit=limit, states=states)

    def check_deletable(self, job_id: str) -> None:
        """A JobError when :meth:`delete` would certainly find nothing: a malformed id, or
        a job without a record in a store that keeps no records of its own (Redis)."""
        check_job_id(job_id)
        if self.results_store.keeps_records:
            return  # rows may outlive the job's Redis records
        try:
            self.store.get(job_id)
        except JobError:
            raise JobError(f"job {job_id!r} is unknown or has expired: nothing to delete") from None

    def delete(self, job_id: str) -> Deleted:
        """Delete a job now: its results (PostgreSQL rows or Redis results) and its Redis
        records. PostgreSQL rows whose Redis records have expired go too. A JobError
        when there is nothing of the job to delete."""
        check_job_id(job_id)
        try:
            record: JobRecord | None = self.store.get(job_id)
        except JobError:
            record = None
        store = self.results_store if record is None else self.results_store_of(record)
        results = keys = 0
        if record is not None:
            results = store.delete_job(record)
            keys = delete_job_records(self.store, record)
        elif isinstance(store, PostgresResultsStore):  # Redis records expired, rows stay
            results = store.delete_rows(job_id)
        if record is None and results == 0:
            raise JobError(f"job {job_id!r} is unknown or has expired: nothing to delete")
        return Deleted(job_id=job_id, results=results, keys=keys, store=store.kind)

    def workers(self) -> WorkersListing:
        """The workers that keep a heartbeat, alive or dead, and the tasks recovered."""
        broker = BrokerRedis(self.app)
        try:
            liveness = Liveness(broker.client, timeout=0)
            listed = liveness.workers()
            values = broker.client.mget([RECOVERED_KEY, RESENT_KEY])
            recovered, resent = (int(v or 0) for v in values)
            return WorkersListing(listed, recovered, resent, liveness.recoveries())
        finally:
            broker.close()

    def cancel(self, job_id: str) -> CancelOutcome:
        """Cancel a job (see :meth:`Job.cancel`); its completion callback says so."""
        outcome = cancel_job(self.store, self.broker.client, job_id)
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

    def send_chunk(self, model: str, index: int, *, producer: Any = None) -> str:
        """Queue one chunk for one model; the task id (the same every time it is sent).

        The message names the chunk; the worker reads its images from the job record.
        ``producer``: the Celery producer to send with (``batched_producer``), else one
        of the app's pool."""
        message = ClassifyMessage(
            job_id=self.job_id, model=model, chunk=index, size=self.record.chunk_len(index)
        )
        self.client.app.send_task(
            CLASSIFY_TASK,
            args=message.to_args(),
            task_id=message.task_id,
            queue=self.record.queue_of(model),
            priority=transport_priority(self.record.priority),
            # What Flower shows (and searches): the job, its name, model and size,
            # not hundreds of paths.
            argsrepr=message.argsrepr(name=self.record.name),
            kwargsrepr="{}",
            producer=producer,
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
        """Per-model counts: total, done, failed, pending; with a notify URL, where the
        completion callback is (``JobStatus.callback``)."""
        status = self.client.store.status(self.job_id)
        status.callback = callback_status(self.client.store, status.job)
        return status

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
        # A task lost on the way (taken off its queue by a worker killed before it
        # was recorded as taken) is sent again by the workers' sweep
        # (workers/sweep.py), for waited jobs as for the others: a task waiting
        # behind other work is not lost, and only the sweep can tell the two apart.
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
        # Started at what is already done (a re-attach): the rate counts only what
        # finishes while this bar runs, not the job's whole past in its first instant.
        bar = tqdm(
            total=status.images_total,
            initial=status.images_finished,
            unit="img",
            desc=f"job {self.job_id}",
            disable=not progress,
            dynamic_ncols=True,
        )
        # When the last read that a notification woke took place: the first one is
        # read at once, so the end of a small job is not held back.
        last_woken_read = -math.inf
        try:
            while True:
                if bar.total != status.images_total:  # a job still being listed grows
                    bar.total = status.images_total
                bar.update(status.images_finished - bar.n)
                failed = sum(c.failed for c in status.models.values())
                bar.set_postfix(failed=failed, refresh=False)
                bar.refresh()
                if status.cancelled or status.job.listing_error:
                    # A failed listing cancels the job; one whose lister died is
                    # cancelled by the sweep a moment later.
                    what = "was cancelled" if status.cancelled else "will not finish"
                    why = f" ({status.job.listing_error})" if status.job.listing_error else ""
                    raise JobCancelledError(
                        f"job {self.job_id} {what}{why}: {status.images_finished}/"
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
                # Woken as soon as a task finishes, such reads at most MIN_REFRESH_S
                # apart (a big job finishes thousands of tasks a second); polled
                # anyway every poll_interval. The pause comes after a wake, and only
                # after one that a notification woke: when it came before every wait
                # (or after a poll), a job done within it (a 1-image job on a GPU, a
                # cached one) waited it out.
                notified = listener.wait(poll_interval)
                if notified:
                    since = time.monotonic() - last_woken_read
                    if since < MIN_REFRESH_S:
                        time.sleep(MIN_REFRESH_S - since)
                if check is not None:
                    check()
                last_read = time.monotonic()
                if notified:
                    last_woken_read = last_read
                if last_read - last_reclaim >= self.client.settings.heartbeat_interval:
                    last_reclaim = last_read
                    self._reclaim(reclaimer)
                status = self._status_patiently(status, deadline)
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
                return self.client.store.status(self.job_id)
            except REDIS_AWAY as exc:
                now = time.monotonic()
                if now > give_up or (deadline is not None and now > deadline):
                    raise
                log.warning("job %s: Redis unreachable (%s); still waiting", self.job_id, exc)
                time.sleep(0.5)

    def _status_patiently(self, last: JobStatus, deadline: float | None) -> JobStatus:
        """The job's status; while Redis is unreachable (a restart), the last one seen."""
        try:
            return self.client.store.status(self.job_id)
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
        return self.client.results_store_of(self.record).iter_records(self.record)

    # -- embeddings ---------------------------------------------------------------
    def embedding_model(self, model: str | None = None) -> str:
        """``model`` when it is one of the job's embedding models; without it, the job's
        only embedding model. ValueError otherwise."""
        registry = self.client.registry()
        known = [m for m in self.record.models if m in registry and registry[m].is_embedding]
        if model is not None:
            if model not in self.record.models:
                raise ValueError(f"job {self.job_id} did not run model {model!r}")
            if model not in known:
                raise ValueError(f"model {model!r} is not an embedding model")
            return model
        if len(known) != 1:
            what = ", ".join(known) if known else "none"
            raise ValueError(
                f"job {self.job_id} has {len(known)} embedding models ({what}): name one"
            )
        return known[0]

    def embeddings(self, model: str | None = None) -> tuple[np.ndarray, list[str]]:
        """Every vector of the job (one embedding model) as an N x D float32 matrix, and
        the images as submitted, in submission order; failed images have no row."""
        name = self.embedding_model(model)
        return self.client.vector_store(name).matrix(self.job_id, name)

    def build_index(self, model: str | None = None) -> None:
        """Build the search index of the job's vectors now (else the first query does)."""
        name = self.embedding_model(model)
        self.client.vector_store(name).build_index(self.job_id, name)

    def similar(
        self, query: str | np.ndarray, *, model: str | None = None, k: int = 10
    ) -> list[Neighbor]:
        """The ``k`` images of the job nearest to ``query`` by cosine similarity, nearest
        first: ``query`` is an image of the job (as submitted; itself left out), an
        image file or URL (embedded through the queue by a worker of the model), or a
        vector."""
        name = self.embedding_model(model)
        vectors = self.client.vector_store(name)
        if not isinstance(query, str):
            return vectors.similar(self.job_id, name, query, k=k)
        try:
            return vectors.similar_to(self.job_id, name, query, k=k)
        except KeyError:
            pass
        vector = self.client.embed(query, model=name)
        return vectors.similar(self.job_id, name, vector, k=k)

    def duplicates(
        self, *, model: str | None = None, threshold: float = 0.95, k: int = 10
    ) -> list[DuplicateGroup]:
        """Groups of near-duplicate images of the job (cosine similarity at least
        ``threshold`` to one of the group, over each image's ``k`` nearest), largest first."""
        name = self.embedding_model(model)
        return self.client.vector_store(name).duplicates(
            self.job_id, name, threshold=threshold, k=k
        )

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

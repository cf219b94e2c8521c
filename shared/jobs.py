"""Job records in Redis, so that ``status`` and ``results`` work from any machine.

Every key is named by ``shared.keys`` and listed, with its lifetime, in
docs/operations.md ("Redis keys"): the job record (``imgq:job:<id>``), its chunks
(``:chunks``), its finished tasks (``:done``), the completion callback's outcome and
lease (``:callback``, ``:callback:lease``), each task's delivery bookkeeping
(``imgq:task:<task id>:*``), and the index of jobs (``imgq:jobs``). All expire after
``IMGQ_RESULT_EXPIRES`` seconds, with the results; ``JobStore.delete`` removes every one of them.

Task ids are derived (``<job>.<model>.<chunk>``, see ``shared.contract``), so a task
delivered twice, or a job resubmitted with the same id, writes the same fields again:
counts never double.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from shared import keys
from shared.contract import ResultDict, decode_images, encode_images, parse_task_id, task_id
from shared.priority import DEFAULT_PRIORITY
from shared.registry import queue_for
from shared.schemas import ImageRef

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
JOB_INDEX_KEY = keys.JOB_INDEX
_PUSH_BATCH = 1000
_DELETE_BATCH = 1000

# Claims a job id: the record's hash gets its id and creation time and, in the same
# step, the job's TTL; a chunk list left by an earlier claim that never completed
# (and expires with it) is cleared. 0 when the id is taken. KEYS: record, chunks.
# ARGV: job id, created, TTL in ms.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'job_id', ARGV[1], 'created', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[2])
return 1
"""

# Appends listed chunks to a job being listed, with the counts in the same step, and
# renews the lister's lease. -1: the job is no longer being listed (deleted, expired,
# its listing failed or was given up); -2: it was cancelled. Else the chunks listed.
# KEYS: record, chunks, lease. ARGV: TTL in ms, lease in ms, images, chunk, chunk ...
_APPEND = """
if redis.call('HEXISTS', KEYS[1], 'listing') == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then return -2 end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'total_images', ARGV[3])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
return redis.call('HINCRBY', KEYS[1], 'n_chunks', #ARGV - 3)
"""

# Renews the lister's lease while the job is being listed; 0 when it no longer is.
# KEYS: record, lease. ARGV: lease in ms.
_RENEW = """
if redis.call('HEXISTS', KEYS[1], 'listing') == 0 then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return 1
"""

# Ends a job's listing: its totals are final. -1: it was no longer being listed.
# With an error (ARGV[1] not empty) the listing failed and the job is cancelled at
# ARGV[2]; ARGV[3] = '1' gives up only a listing whose lister's lease has lapsed (0
# when it has not). KEYS: record, lease.
_END = """
if redis.call('HEXISTS', KEYS[1], 'listing') == 0 then return -1 end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'listing_error', ARGV[1])
  redis.call('HSETNX', KEYS[1], 'cancelled', ARGV[2])
end
redis.call('HDEL', KEYS[1], 'listing')
redis.call('DEL', KEYS[2])
return 1
"""

# Seconds a lister's lease lasts; the lister renews it every third of that, from a
# thread, so a slow source (a network folder) does not lose it.
LISTING_LEASE_S = 30.0
LISTER_GONE = "the listing stopped: the process that submitted the job went away"


class JobError(ValueError):
    """A job id is malformed, unknown or expired, or a job conflicts with an existing one."""


class ListingStopped(JobError):
    """A job's listing cannot go on: the job was cancelled, deleted, or its listing was
    given up (its lister's lease lapsed)."""


class ListingCancelled(ListingStopped):
    """A job's listing cannot go on because the job was cancelled meanwhile."""


def new_job_id() -> str:
    """A readable, unique job id: UTC time plus random hex."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def check_job_id(job_id: str) -> str:
    """The job id, or a JobError when it has characters a job id may not have."""
    if not JOB_ID_RE.match(job_id):
        raise JobError(f"job id {job_id!r} must be 1-64 letters, digits, '-' or '_'")
    return job_id


@dataclass(frozen=True)
class JobRecord:
    """What is known about a job when it is submitted."""

    job_id: str
    models: tuple[str, ...]
    total_images: int
    chunk_size: int
    n_chunks: int
    created: float
    name: str = ""
    priority: int = DEFAULT_PRIORITY
    cancelled: float | None = None  # when it was cancelled
    notify: str = ""  # the completion callback's URL, if any
    results_store: str = ""  # where its results go: redis, postgresql ("": not recorded)
    # Still being listed: chunks are appended and their tasks sent, the totals grow.
    listing: bool = False
    # Why its listing did not end (a source that failed part-way, a lister that went
    # away); "" when it ended or goes on.
    listing_error: str = ""
    # Models whose tasks go to another model's queue: a head of your own labels
    # (``dogs@2``) -> the embedding model it applies to (``shared.heads``).
    routes: dict[str, str] = field(default_factory=dict)

    def queue_of(self, model: str) -> str:
        """The queue of the job's tasks for ``model``: its own, or its base model's."""
        return queue_for(self.routes.get(model, model))

    def chunk_len(self, index: int) -> int:
        """How many images chunk ``index`` holds (all are ``chunk_size`` but the last)."""
        if not 0 <= index < self.n_chunks:
            raise JobError(f"job {self.job_id!r} has no chunk {index}")
        return min(self.chunk_size, self.total_images - index * self.chunk_size)

    def task_ids(self, model: str) -> list[str]:
        """The job's task ids for one model, in chunk order."""
        return [task_id(self.job_id, model, i) for i in range(self.n_chunks)]


@dataclass
class ModelCounts:
    """Per-image counts for one model of a job."""

    total: int
    done: int = 0
    failed: int = 0
    tasks_total: int = 0
    tasks_finished: int = 0

    @property
    def pending(self) -> int:
        """Images with neither a result nor an error yet."""
        return self.total - self.done - self.failed

    def as_dict(self) -> dict[str, int]:
        """Counts as a plain dict (for JSON output)."""
        return {
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "pending": self.pending,
        }


@dataclass(frozen=True)
class CallbackStatus:
    """Where a job's completion callback is (``shared.notify``).

    ``state``: ``pending`` (the job has not ended, or no process holds the send yet),
    ``sending`` (a process holds the lease and tries), ``sent`` (a 2xx answer) or
    ``failed`` (refused, or every try spent). ``attempts`` counts the POSTs made by all
    processes together; ``last_error`` is the latest failed try's, ``http_status`` the
    latest answer's status.
    """

    state: str
    attempts: int = 0
    last_error: str | None = None
    http_status: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types."""
        return {
            "state": self.state,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "http_status": self.http_status,
        }


@dataclass
class JobStatus:
    """Progress of a job, per model; ``callback`` is read where it is shown (the API's
    ``Job.status``, ``imgq jobs``), and None elsewhere or without a notify URL."""

    job: JobRecord
    models: dict[str, ModelCounts] = field(default_factory=dict)
    callback: CallbackStatus | None = None

    @property
    def finished(self) -> bool:
        """True when the job is listed and every task of every model has finished (a
        job still being listed has not finished, even if every task sent so far has)."""
        if self.job.listing:
            return False
        return all(c.tasks_finished >= c.tasks_total for c in self.models.values())

    @property
    def cancelled(self) -> bool:
        """True when the job was cancelled (its unstarted tasks never run)."""
        return self.job.cancelled is not None

    @property
    def images_finished(self) -> int:
        """Image results (classified or failed) summed over models."""
        return sum(c.done + c.failed for c in self.models.values())

    @property
    def images_total(self) -> int:
        """Images times models."""
        return sum(c.total for c in self.models.values())


class JobStore:
    """Reads and writes job records in Redis."""

    def __init__(
        self, client: redis.Redis, *, ttl: int, listing_lease: float = LISTING_LEASE_S
    ) -> None:
        self.client = client
        self.ttl = ttl
        self.listing_lease = listing_lease
        self._claim = client.register_script(_CLAIM)
        self._append = client.register_script(_APPEND)
        self._renew = client.register_script(_RENEW)
        self._end = client.register_script(_END)

    def create(
        self,
        job_id: str,
        models: Sequence[str],
        chunks: Sequence[Sequence[ImageRef]],
        *,
        chunk_size: int,
        name: str = "",
        priority: int = DEFAULT_PRIORITY,
        notify: str | None = None,
        results_store: str = "",
        routes: dict[str, str] | None = None,
    ) -> JobRecord:
        """Record a new job and all its chunks at once; a JobError if the id is taken.

        :meth:`begin`, :meth:`append` in batches of ``_PUSH_BATCH`` chunks, then
        :meth:`end_listing`: what a producer that streams its sources does, for chunks
        already in hand."""
        self.begin(
            job_id,
            models,
            chunk_size=chunk_size,
            name=name,
            priority=priority,
            notify=notify,
            results_store=results_store,
            routes=routes,
        )
        for start in range(0, len(chunks), _PUSH_BATCH):
            batch = chunks[start : start + _PUSH_BATCH]
            self.append(job_id, [encode_chunk(c) for c in batch], sum(len(c) for c in batch))
        self.end_listing(job_id)
        return self.get(job_id)

    def begin(
        self,
        job_id: str,
        models: Sequence[str],
        *,
        chunk_size: int,
        name: str = "",
        priority: int = DEFAULT_PRIORITY,
        notify: str | None = None,
        results_store: str = "",
        routes: dict[str, str] | None = None,
    ) -> JobRecord:
        """Record a new job in its "listing" state, with no chunk yet; a JobError if the
        id is taken. The caller holds the listing's lease (``listing_lease`` seconds,
        renewed by :meth:`append` and :meth:`renew_listing`) until :meth:`end_listing`.

        ``notify`` is the URL its completion callback goes to (``shared.notify``);
        ``results_store`` the kind of store its results go to (redis, postgresql);
        ``routes`` the models whose tasks go to another model's queue
        (:attr:`JobRecord.routes`).

        Nothing is left without a TTL whenever the producer dies: the id is claimed by
        a script that creates the record with its TTL in the same step (a record
        without ``n_chunks`` is a job whose ``begin`` never completed: ``get`` calls it
        unknown, and its id stays taken until it expires); the record's fields, the
        lease (with its own short TTL) and the job's entry in the index go in one
        MULTI; each batch of chunks goes in with the list's TTL (:meth:`append`). A job
        whose lister died keeps its "listing" field with no lease: ``get`` says its
        listing stopped, and the workers' sweep gives it up (:meth:`give_up_listing`).
        (The ``:done`` hash gets its TTL when its first field is written, by
        ``mark_finished``.)
        """
        check_job_id(job_id)
        created = time.time()
        meta: dict[Any, Any] = {  # redis-py types mapping keys invariantly
            "job_id": job_id,
            "models": json.dumps(list(models)),
            "total_images": "0",
            "chunk_size": str(chunk_size),
            "n_chunks": "0",
            "created": repr(created),
            "name": name,
            "priority": str(priority),
            "listing": "1",
        }
        if notify:
            meta["notify"] = notify
        if results_store:
            meta["results"] = results_store
        if routes:
            meta["routes"] = json.dumps(routes)
        key, ckey = keys.job(job_id), keys.job_chunks(job_id)
        ttl_ms = self.ttl * 1000
        if not int(self._claim(keys=[key, ckey], args=[job_id, repr(created), ttl_ms])):
            raise JobError(f"job {job_id!r} already exists")
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=meta)
        pipe.pexpire(key, ttl_ms)
        pipe.set(keys.job_listing(job_id), "1", px=self._lease_ms)
        # The index of jobs for listing; entries older than the records expire.
        pipe.zadd(JOB_INDEX_KEY, {job_id: created})
        pipe.zremrangebyscore(JOB_INDEX_KEY, "-inf", created - self.ttl)
        pipe.pexpire(JOB_INDEX_KEY, ttl_ms)
        pipe.execute()
        return JobRecord(
            job_id=job_id,
            models=tuple(models),
            total_images=0,
            chunk_size=chunk_size,
            n_chunks=0,
            created=created,
            name=name,
            priority=priority,
            notify=notify or "",
            results_store=results_store,
            listing=True,
            routes=dict(routes or {}),
        )

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.listing_lease * 1000))

    def append(self, job_id: str, encoded: Sequence[bytes], n_images: int) -> int:
        """Append chunks (from :func:`encode_chunk`) holding ``n_images`` images to a job
        being listed, its counts with them in one step; the job's chunks so far.
        ListingStopped when the job is no longer being listed or was cancelled."""
        if not encoded:
            return int(self.client.hget(keys.job(job_id), "n_chunks") or 0)
        done = int(
            self._append(
                keys=[keys.job(job_id), keys.job_chunks(job_id), keys.job_listing(job_id)],
                args=[self.ttl * 1000, self._lease_ms, n_images, *encoded],
            )
        )
        if done == -2:
            raise ListingCancelled(f"job {job_id} was cancelled while its sources were listed")
        if done < 0:
            raise ListingStopped(
                f"job {job_id} is no longer being listed (deleted, expired or given up)"
            )
        return done

    def renew_listing(self, job_id: str) -> bool:
        """Renew the lister's lease; False when the job is no longer being listed."""
        return bool(
            int(
                self._renew(
                    keys=[keys.job(job_id), keys.job_listing(job_id)], args=[self._lease_ms]
                )
            )
        )

    def end_listing(self, job_id: str, error: str = "") -> bool:
        """End a job's listing: its totals are final. With ``error``, the listing failed
        part-way: the error is kept in the record and the job is cancelled (its queued
        tasks are the caller's to purge, ``shared.jobctl.purge_queued``). False when it
        was no longer being listed."""
        return self._end_listing(job_id, error, only_lapsed=False)

    def give_up_listing(self, job_id: str) -> bool:
        """End, as failed and cancelled, the listing of a job whose lister's lease has
        lapsed (the producer died); False when it is still held or already ended."""
        return self._end_listing(job_id, LISTER_GONE, only_lapsed=True)

    def _end_listing(self, job_id: str, error: str, *, only_lapsed: bool) -> bool:
        done = self._end(
            keys=[keys.job(job_id), keys.job_listing(job_id)],
            args=[error, repr(time.time()), "1" if only_lapsed else "0"],
        )
        return int(done) == 1

    def delete(self, job_id: str) -> int:
        """Delete every key of a job in the job store (record, chunks, finished tasks,
        completion callback's outcome and lease, sweep state, each task's delivery
        bookkeeping) and its entries in the job, open-job and callbacks-due indexes; how
        many keys went.

        The one method that knows them all (docs/operations.md, "Redis keys"). A
        job whose record has expired loses what is left of its own keys; its tasks'
        bookkeeping, named by task, expires with it.
        """
        check_job_id(job_id)
        names = [
            keys.job(job_id),
            keys.job_chunks(job_id),
            keys.job_done(job_id),
            keys.job_notified(job_id),
            keys.job_callback(job_id),
            keys.job_callback_lease(job_id),
            keys.sweep_state(job_id),
            keys.job_listing(job_id),
        ]
        try:
            record: JobRecord | None = self.get(job_id)
        except JobError:
            record = None
        if record is not None:
            for model in record.models:
                for tid in record.task_ids(model):
                    names.extend(keys.task_keys(tid))
        deleted = 0
        for start in range(0, len(names), _DELETE_BATCH):
            deleted += int(self.client.delete(*names[start : start + _DELETE_BATCH]))
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(JOB_INDEX_KEY, job_id)
        pipe.zrem(keys.OPEN_JOBS, job_id)
        pipe.zrem(keys.CALLBACKS_DUE, job_id)
        pipe.execute()
        return deleted

    def get(self, job_id: str) -> JobRecord:
        """The job record, or a JobError saying it is unknown or expired."""
        check_job_id(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(keys.job(job_id))
        pipe.exists(keys.job_listing(job_id))
        raw, leased = pipe.execute()
        if not raw or b"n_chunks" not in raw:
            raise JobError(
                f"job {job_id!r} is unknown or has expired (job records and results are "
                "kept for IMGQ_RESULT_EXPIRES seconds)"
            )
        data = {k.decode(): v.decode() for k, v in raw.items()}
        return JobRecord(
            job_id=data["job_id"],
            models=tuple(json.loads(data["models"])),
            total_images=int(data["total_images"]),
            chunk_size=int(data["chunk_size"]),
            n_chunks=int(data["n_chunks"]),
            created=float(data["created"]),
            name=data.get("name", ""),
            priority=int(data.get("priority", DEFAULT_PRIORITY)),
            cancelled=float(data["cancelled"]) if "cancelled" in data else None,
            notify=data.get("notify", ""),
            results_store=data.get("results", ""),
            listing="listing" in data,
            listing_error=data.get("listing_error")
            or ("" if "listing" not in data or leased else LISTER_GONE),
            routes=json.loads(data["routes"]) if "routes" in data else {},
        )

    def is_cancelled(self, job_id: str) -> bool:
        """True when the job was cancelled: its tasks must not start (one HEXISTS)."""
        return bool(self.client.hexists(keys.job(job_id), "cancelled"))

    def chunk(self, job_id: str, index: int) -> list[ImageRef]:
        """The image references of one chunk."""
        raw = self.client.lindex(keys.job_chunks(job_id), index)
        if raw is None:
            self.get(job_id)  # a JobError saying the job is unknown or expired
            raise JobError(f"job {job_id!r} has no chunk {index}")
        return _decode_chunk(raw)

    def mark_finished(self, tid: str, *, ok: int, failed: int) -> None:
        """Record that a task finished with ``ok`` results and ``failed`` errors (idempotent),
        and tell whoever waits for the job."""
        job_id = parse_task_id(tid)[0]
        key = keys.job_done(job_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, tid, f"{ok} {failed}")
        pipe.expire(key, self.ttl)
        pipe.delete(*keys.task_keys(tid))  # its delivery bookkeeping is no longer needed
        pipe.publish(keys.job_progress(job_id), tid)
        pipe.execute()

    def is_finished(self, tid: str) -> bool:
        """True when the task is recorded as finished (one HEXISTS on the done hash)."""
        job_id = parse_task_id(tid)[0]
        return bool(self.client.hexists(keys.job_done(job_id), tid))

    def listen(self, job_id: str) -> ProgressListener:
        """A subscription to a job's progress notifications (subscribe before reading status)."""
        return ProgressListener(self.client, keys.job_progress(job_id))

    def finished_tasks(self, job_id: str) -> dict[str, tuple[int, int]]:
        """Task id -> (ok, failed) for every finished task of a job."""
        raw: dict[bytes, bytes] = self.client.hgetall(keys.job_done(job_id))  # type: ignore[assignment]
        out: dict[str, tuple[int, int]] = {}
        for k, v in raw.items():
            ok, failed = v.split()
            out[k.decode()] = (int(ok), int(failed))
        return out

    def status(self, job_id: str) -> JobStatus:
        """Per-model counts of a job."""
        job = self.get(job_id)
        status = JobStatus(
            job=job,
            models={
                m: ModelCounts(total=job.total_images, tasks_total=job.n_chunks) for m in job.models
            },
        )
        for tid, (ok, failed) in self.finished_tasks(job_id).items():
            model = parse_task_id(tid)[1]
            counts = status.models.get(model)
            if counts is None:
                continue
            counts.done += ok
            counts.failed += failed
            counts.tasks_finished += 1
        return status


class ProgressListener:
    """Wakes a waiting producer as soon as a task of its job finishes.

    Notifications only shorten waits: a lost one (Redis restarting) costs at most
    one poll interval, since the caller reads the status after every wait.
    """

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._pubsub: Any = None
        self._subscribe()

    def _subscribe(self) -> None:
        try:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(self.channel)
            self._pubsub = pubsub
        except redis.exceptions.RedisError:
            self._pubsub = None

    def wait(self, timeout: float) -> bool:
        """Block until a notification or ``timeout`` seconds; True when notified."""
        if self._pubsub is None:
            self._subscribe()
            if self._pubsub is None:
                time.sleep(timeout)
                return False
        deadline = time.monotonic() + timeout
        try:
            # None also comes back for the subscription's own confirmation.
            while (left := deadline - time.monotonic()) > 0:
                if self._pubsub.get_message(timeout=left) is not None:
                    while self._pubsub.get_message(timeout=0) is not None:
                        pass  # several tasks finished: one status read covers them all
                    return True
            return False
        except (redis.exceptions.RedisError, OSError):
            self.close()
            time.sleep(min(timeout, 0.5))
            return False

    def close(self) -> None:
        """Unsubscribe and release the connection."""
        if self._pubsub is not None:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                self._pubsub.close()
            self._pubsub = None


class AttemptStore:
    """Per-task delivery bookkeeping, so that an input that kills worker processes
    cannot make its task loop forever.

    Keys (``shared.keys``, expiring with the job): ``imgq:task:<id>:attempts``
    (deliveries started), ``:inflight`` (the image being worked on, one at a time,
    after a first crash), ``:partial`` (records already made, kept across crashes),
    ``:strikes`` (process deaths while an image was in flight, per image), ``:holder``
    (the worker that started the latest delivery).
    """

    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.client = client
        self.ttl = ttl

    def begin(self, tid: str) -> int:
        """Count one more delivery of a task that starts to run; the count (1 the first time)."""
        key = keys.task_attempts(tid)
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, self.ttl)
        return int(pipe.execute()[0])

    def begin_held(self, tid: str, holder: str) -> tuple[int, str | None]:
        """Count one more delivery, started by worker ``holder``; the count and the
        worker that started the delivery before (None the first time)."""
        key, hkey = keys.task_attempts(tid), keys.task_holder(tid)
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, self.ttl)
        pipe.set(hkey, holder, ex=self.ttl, get=True)
        count, _, before = pipe.execute()
        return int(count), before.decode() if isinstance(before, bytes) else before

    def inflight(self, tid: str) -> int | None:
        """The image a previous delivery was working on when its process died, if any."""
        raw = self.client.get(keys.task_inflight(tid))
        return None if raw is None else int(raw)

    def set_inflight(self, tid: str, index: int) -> None:
        """Record the image about to be worked on."""
        self.client.set(keys.task_inflight(tid), index, ex=self.ttl)

    def partial(self, tid: str) -> dict[int, ResultDict]:
        """Records already made by earlier deliveries, by position in the chunk."""
        raw: dict[bytes, bytes] = self.client.hgetall(keys.task_partial(tid))  # type: ignore[assignment]
        return {int(k): json.loads(v) for k, v in raw.items()}

    def strike(self, tid: str, index: int) -> int:
        """Count one more process death while an image was being worked on; the count."""
        key = keys.task_strikes(tid)
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(key, str(index), 1)
        pipe.expire(key, self.ttl)
        return int(pipe.execute()[0])

    def save_partial(self, tid: str, index: int, record: ResultDict) -> None:
        """Keep one record so that a later delivery does not redo it."""
        key = keys.task_partial(tid)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, str(index), json.dumps(record))
        pipe.delete(keys.task_inflight(tid))
        pipe.expire(key, self.ttl)
        pipe.execute()


def encode_chunk(refs: Iterable[ImageRef]) -> bytes:
    """A chunk as the job record keeps it: its wire form (``encode_images``) as JSON,
    compressed with zlib. A chunk's paths share long prefixes, so this is a fifth to a
    tenth of the JSON (``benchmarks/bigjob.py``), and one chunk is still one list
    element, read by one LINDEX."""
    return zlib.compress(json.dumps(encode_images(refs), separators=(",", ":")).encode(), 6)


def _decode_chunk(raw: bytes | str) -> list[ImageRef]:
    # Plain JSON (a list, "[...") as versions before compression wrote it; zlib's
    # stream never starts with "[".
    if isinstance(raw, str):
        raw = raw.encode()
    text = raw if raw[:1] == b"[" else zlib.decompress(raw)
    return decode_images(json.loads(text))

"""Job records in Redis, so that ``status`` and ``results`` work from any machine.

Keys (all expire after ``IMGQ_RESULT_EXPIRES`` seconds, with the results):

- ``imgq:job:<id>``           hash: id, models, total images, chunk size, chunk count, created,
                              name, priority, cancelled (time, once cancelled)
                              notify URL (when given)
- ``imgq:job:<id>:notified``  string: claimed by the process that sends the completion callback
- ``imgq:job:<id>:chunks``    list: chunk i is a JSON list of image references
- ``imgq:job:<id>:done``      hash: task id -> "ok failed" for every finished task
- ``imgq:jobs``               sorted set: job id by creation time (``imgq jobs``)

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from shared.contract import ResultDict, decode_images, encode_images, parse_task_id, task_id
from shared.priority import DEFAULT_PRIORITY
from shared.schemas import ImageRef

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX = "imgq:job:"
JOB_INDEX_KEY = "imgq:jobs"
_PUSH_BATCH = 1000


class JobError(ValueError):
    """A job id is malformed, unknown or expired, or a job conflicts with an existing one."""


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


@dataclass
class JobStatus:
    """Progress of a job, per model."""

    job: JobRecord
    models: dict[str, ModelCounts] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True when every task of every model has finished."""
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

    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.client = client
        self.ttl = ttl

    @staticmethod
    def _key(job_id: str, suffix: str = "") -> str:
        return f"{_PREFIX}{job_id}{suffix}"

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
    ) -> JobRecord:
        """Record a new job and its chunks; a JobError if the id is taken by a different job.

        ``notify`` is the URL its completion callback goes to (``shared.notify``)."""
        check_job_id(job_id)
        record = JobRecord(
            job_id=job_id,
            models=tuple(models),
            total_images=sum(len(c) for c in chunks),
            chunk_size=chunk_size,
            n_chunks=len(chunks),
            created=time.time(),
            name=name,
            priority=priority,
        )
        meta: dict[Any, Any] = {  # redis-py types mapping keys invariantly
            "job_id": job_id,
            "models": json.dumps(list(record.models)),
            "total_images": str(record.total_images),
            "chunk_size": str(chunk_size),
            "n_chunks": str(record.n_chunks),
            "created": repr(record.created),
            "name": name,
            "priority": str(priority),
        }
        if notify:
            meta["notify"] = notify
        key = self._key(job_id)
        # HSETNX on the id field claims the job atomically; a second submit with
        # the same id finds it claimed.
        if not self.client.hsetnx(key, "job_id", job_id):
            raise JobError(f"job {job_id!r} already exists")
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping=meta)
        ckey = self._key(job_id, ":chunks")
        pipe.delete(ckey)
        encoded = [json.dumps(encode_images(chunk)) for chunk in chunks]
        for start in range(0, len(encoded), _PUSH_BATCH):
            pipe.rpush(ckey, *encoded[start : start + _PUSH_BATCH])
        for k in (key, ckey, self._key(job_id, ":done")):
            pipe.expire(k, self.ttl)
        # The index of jobs for listing; entries older than the records expire here too.
        pipe.zadd(JOB_INDEX_KEY, {job_id: record.created})
        pipe.zremrangebyscore(JOB_INDEX_KEY, "-inf", record.created - self.ttl)
        pipe.expire(JOB_INDEX_KEY, self.ttl)
        pipe.execute()
        return record

    def get(self, job_id: str) -> JobRecord:
        """The job record, or a JobError saying it is unknown or expired."""
        check_job_id(job_id)
        raw: dict[bytes, bytes] = self.client.hgetall(self._key(job_id))  # type: ignore[assignment]
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
        )

    def is_cancelled(self, job_id: str) -> bool:
        """True when the job was cancelled: its tasks must not start (one HEXISTS)."""
        return bool(self.client.hexists(self._key(job_id), "cancelled"))

    def chunk(self, job_id: str, index: int) -> list[ImageRef]:
        """The image references of one chunk."""
        raw = self.client.lindex(self._key(job_id, ":chunks"), index)
        if raw is None:
            self.get(job_id)  # a JobError saying the job is unknown or expired
            raise JobError(f"job {job_id!r} has no chunk {index}")
        return _decode_chunk(raw)

    def mark_finished(self, tid: str, *, ok: int, failed: int) -> None:
        """Record that a task finished with ``ok`` results and ``failed`` errors (idempotent),
        and tell whoever waits for the job."""
        job_id = parse_task_id(tid)[0]
        key = self._key(job_id, ":done")
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, tid, f"{ok} {failed}")
        pipe.expire(key, self.ttl)
        pipe.delete(*attempt_keys(tid))  # its delivery bookkeeping is no longer needed
        pipe.publish(self._key(job_id, ":progress"), tid)
        pipe.execute()

    def listen(self, job_id: str) -> ProgressListener:
        """A subscription to a job's progress notifications (subscribe before reading status)."""
        return ProgressListener(self.client, self._key(job_id, ":progress"))

    def finished_tasks(self, job_id: str) -> dict[str, tuple[int, int]]:
        """Task id -> (ok, failed) for every finished task of a job."""
        raw: dict[bytes, bytes] = self.client.hgetall(self._key(job_id, ":done"))  # type: ignore[assignment]
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


def attempt_keys(tid: str) -> tuple[str, str, str, str]:
    """The keys of a task's delivery bookkeeping: attempts, in-flight image, partial
    records, deaths per image."""
    prefix = f"imgq:task:{tid}:"
    return prefix + "attempts", prefix + "inflight", prefix + "partial", prefix + "strikes"


class AttemptStore:
    """Per-task delivery bookkeeping, so that an input that kills worker processes
    cannot make its task loop forever.

    Keys (expiring with the job): ``imgq:task:<id>:attempts`` (deliveries started),
    ``:inflight`` (the image being worked on, one at a time, after a first crash),
    ``:partial`` (records already made, kept across crashes), ``:strikes`` (process
    deaths while an image was in flight, per image).
    """

    def __init__(self, client: redis.Redis, *, ttl: int) -> None:
        self.client = client
        self.ttl = ttl

    @staticmethod
    def _key(tid: str, suffix: str) -> str:
        return f"imgq:task:{tid}:{suffix}"

    def begin(self, tid: str) -> int:
        """Count one more delivery of a task that starts to run; the count (1 the first time)."""
        key = self._key(tid, "attempts")
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, self.ttl)
        return int(pipe.execute()[0])

    def inflight(self, tid: str) -> int | None:
        """The image a previous delivery was working on when its process died, if any."""
        raw = self.client.get(self._key(tid, "inflight"))
        return None if raw is None else int(raw)

    def set_inflight(self, tid: str, index: int) -> None:
        """Record the image about to be worked on."""
        self.client.set(self._key(tid, "inflight"), index, ex=self.ttl)

    def partial(self, tid: str) -> dict[int, ResultDict]:
        """Records already made by earlier deliveries, by position in the chunk."""
        raw: dict[bytes, bytes] = self.client.hgetall(self._key(tid, "partial"))  # type: ignore[assignment]
        return {int(k): json.loads(v) for k, v in raw.items()}

    def strike(self, tid: str, index: int) -> int:
        """Count one more process death while an image was being worked on; the count."""
        key = self._key(tid, "strikes")
        pipe = self.client.pipeline(transaction=False)
        pipe.hincrby(key, str(index), 1)
        pipe.expire(key, self.ttl)
        return int(pipe.execute()[0])

    def save_partial(self, tid: str, index: int, record: ResultDict) -> None:
        """Keep one record so that a later delivery does not redo it."""
        key = self._key(tid, "partial")
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, str(index), json.dumps(record))
        pipe.delete(self._key(tid, "inflight"))
        pipe.expire(key, self.ttl)
        pipe.execute()


def _decode_chunk(raw: bytes | str) -> list[ImageRef]:
    return decode_images(json.loads(raw))

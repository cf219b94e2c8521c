"""Where result records live, chosen by ``IMGQ_RESULTS_URL``: Redis or PostgreSQL.

- ``redis`` (the default): a task's records are its Celery result, in the result
  backend's Redis, expiring after ``IMGQ_RESULT_EXPIRES``.
- ``postgresql://...``: workers write a chunk's records into the ``imgq_results``
  table in one statement, idempotently (primary key: job, image position, model);
  the Celery result is a small summary. Rows stay until ``imgq delete``.

Either way, *which tasks are finished* comes from the Redis job bookkeeping
(``shared.jobs``): status, waiting, resending and cancelling work the same.
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, TypeAdapter, ValidationError

from shared.contract import ResultDict, error_result, task_id
from shared.jobs import JOB_INDEX_KEY, JobRecord, JobStore, attempt_keys
from shared.open_jobs import OPEN_JOBS_KEY
from shared.schemas import ErrorCode, ImageRef, ResultRecord, error_record

log = logging.getLogger(__name__)

_MGET_BATCH = 500
# Rows fetched per round trip from PostgreSQL's server-side cursor.
PG_FETCH_ROWS = 5000
# How long a worker keeps retrying a write while PostgreSQL is away (a restart).
PG_PATIENCE_S = 120.0


class ResultsStoreError(RuntimeError):
    """The results store is misconfigured or unreachable (one line, no password)."""


class ResultsSchemaError(ResultsStoreError):
    """The results table's schema is newer than this imgq: waiting cannot help."""


class ResultsStore(Protocol):
    """Writes a chunk's records (workers) and reads a job's records back (producers)."""

    kind: str

    @property
    def keeps_records(self) -> bool:
        """True when workers write records here; False when they travel as the task result."""
        ...

    def check(self) -> None:
        """Reach the store and make it ready (schema); ResultsStoreError when it cannot."""
        ...

    def write_chunk(
        self, job_id: str, model: str, first: int, records: Sequence[ResultDict]
    ) -> None:
        """Store one chunk's records; ``first`` is the job position of its first image."""
        ...

    def iter_records(self, job: JobRecord) -> Iterator[ResultRecord]:
        """Every stored record of a job, in submission order, read in bounded batches."""
        ...

    def delete_job(self, job: JobRecord) -> int:
        """Remove a job's records; how many results (rows or task results) went."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


# --- Redis: records are the Celery task results ----------------------------------------
@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many objects at once.

    Results are acyclic (reference counting frees them); without the pause,
    collections triggered by the allocations traverse every record kept so far,
    which made fetching 40,000 records six times slower.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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
        """Nothing to prepare: the result backend is the broker's Redis."""

    def write_chunk(
        self, job_id: str, model: str, first: int, records: Sequence[ResultDict]
    ) -> None:
        """Nothing to do: the records travel as the task's result."""

    def outcomes(self, task_ids: Sequence[str]) -> list[TaskOutcome]:
        """The result backend's state (and records) of each task, in order."""
        backend = self.backend
        out: list[TaskOutcome] = []
        with gc_paused():
            for start in range(0, len(task_ids), _MGET_BATCH):
                batch = task_ids[start : start + _MGET_BATCH]
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
        """Records chunk by chunk and model by model, ``_MGET_BATCH`` chunks at a time.

        A task that failed for good yields a ``task_failed`` record for each of its
        images, so a finished job has exactly one record per image and model.
        """
        models = job.models
        n = job.n_chunks
        for start in range(0, n, _MGET_BATCH):
            stop = min(n, start + _MGET_BATCH)
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
        for start in range(0, len(keys), _MGET_BATCH):
            deleted += int(self.jobs.client.delete(*keys[start : start + _MGET_BATCH]))
        return deleted

    def close(self) -> None:
        """Nothing of its own to release (the Celery app owns the connections)."""


# --- PostgreSQL ------------------------------------------------------------------------
def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _scrub(message: str, url: str) -> str:
    """One line of a driver message with the password (plain and URL-encoded) removed."""
    line = " ".join(message.strip().split())
    secret = _password(url)
    if secret:
        for form in {secret, unquote(secret)}:
            line = line.replace(form, "***")
    return line


def explain_connect_error(exc: Exception, url: str) -> str:
    """What went wrong reaching PostgreSQL and what to do, in one line, without the password."""
    where = redact_url(url)
    text = _scrub(str(exc), url)
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        what = "PostgreSQL refused the user name or password"
        todo = "check the user and password in IMGQ_RESULTS_URL"
    elif "database" in low and "does not exist" in low:
        what = "the database does not exist"
        todo = "create it (createdb NAME) or fix the database name in IMGQ_RESULTS_URL"
    elif "role" in low and "does not exist" in low:
        what = "the user does not exist on the server"
        todo = "create it (createuser NAME) or fix the user in IMGQ_RESULTS_URL"
    elif any(
        s in low
        for s in (
            "connection refused",
            "could not connect",
            "timeout expired",
            "no route to host",
            "name or service not known",
            "could not translate host name",
            "the database system is starting up",
            "the database system is shutting down",
        )
    ):
        what = "cannot reach the PostgreSQL server"
        todo = "start it, or point IMGQ_RESULTS_URL at a running server"
    else:
        what = "cannot use PostgreSQL"
        todo = "check IMGQ_RESULTS_URL"
    return f"results store {where}: {what} ({text}); {todo}"


def _check_url(url: str) -> None:
    """A ResultsStoreError when ``url`` is not a PostgreSQL URL libpq can parse."""
    from psycopg import conninfo

    try:
        conninfo.conninfo_to_dict(url)
        port = urlsplit(url).port  # libpq reads a bad port only when connecting
    except Exception as exc:
        raise ResultsStoreError(
            f"IMGQ_RESULTS_URL is not a valid PostgreSQL URL ({_scrub(str(exc), url)}): "
            "use postgresql://USER:PASSWORD@HOST:5432/DATABASE, or 'redis'"
        ) from None
    del port


def _is_disconnect(exc: BaseException) -> bool:
    """True for errors a reconnect can cure (server restarting, connection lost)."""
    import psycopg

    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    # Raised on a connection whose server is shutting down (admin_shutdown, ...).
    return isinstance(exc, psycopg.errors.AdminShutdown | psycopg.errors.CannotConnectNow)


# The arrays travel in binary (%b): in text form every quote of the JSON would be
# escaped in Python, which cost more than the insert itself.
_INSERT = """
INSERT INTO imgq_results (job_id, position, model, source, top1_index, top1_label,
                          top1_score, top5, error_code, error_message)
SELECT %(job)s, u.position, %(model)s, u.source, u.top1_index, u.top1_label, u.top1_score,
       u.top5::jsonb, u.error_code, u.error_message
FROM unnest(%(position)b::integer[], %(source)b::text[], %(top1_index)b::integer[],
            %(top1_label)b::text[], %(top1_score)b::real[], %(top5)b::text[],
            %(error_code)b::text[], %(error_message)b::text[])
     AS u(position, source, top1_index, top1_label, top1_score, top5, error_code, error_message)
ON CONFLICT (job_id, position, model) DO UPDATE SET
    source = EXCLUDED.source, top1_index = EXCLUDED.top1_index,
    top1_label = EXCLUDED.top1_label, top1_score = EXCLUDED.top1_score,
    top5 = EXCLUDED.top5, error_code = EXCLUDED.error_code,
    error_message = EXCLUDED.error_message, created_at = now()
"""

_SELECT = """
SELECT position, model, source, top5::text, error_code, error_message
FROM imgq_results WHERE job_id = %s ORDER BY position, model
"""

_RECORD = TypeAdapter(ResultRecord)


class PostgresResultsStore:
    """One row per image and model in ``imgq_results``; one connection per thread."""

    kind = "postgresql"

    def __init__(
        self, url: str, *, patience_s: float = PG_PATIENCE_S, connect_timeout: int = 10
    ) -> None:
        _check_url(url)
        self.url = url
        self.patience_s = patience_s
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._ready = False
        self._lock = threading.Lock()

    @property
    def keeps_records(self) -> bool:
        """Workers write records here; the task result is a summary."""
        return True

    def connect(self) -> Any:
        """A new autocommit connection; ResultsStoreError (one line) when it fails."""
        import psycopg

        try:
            return psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=self.connect_timeout,
                application_name="imgq",
            )
        except psycopg.Error as exc:
            raise ResultsStoreError(explain_connect_error(exc, self.url)) from None

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self.connect()
            self._local.conn = conn
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing a broken connection failed", exc_info=True)

    def check(self) -> None:
        """Connect and create or migrate the schema (once per process)."""
        from shared.pg_schema import SchemaError, ensure_schema

        with self._lock:
            if self._ready:
                return
            try:
                ensure_schema(self._conn())
            except SchemaError as exc:
                raise ResultsSchemaError(f"results store {redact_url(self.url)}: {exc}") from None
            except ResultsStoreError:
                raise
            except Exception as exc:
                self._drop_conn()
                raise ResultsStoreError(explain_connect_error(exc, self.url)) from None
            self._ready = True

    def _patiently(self, action: Any, what: str) -> Any:
        """Run ``action(conn)``, reconnecting with backoff while the server is away."""
        delay = 0.2
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                self.check()
                return action(self._conn())
            except ResultsSchemaError:
                raise
            except Exception as exc:
                cause: BaseException = exc
                if isinstance(exc, ResultsStoreError):
                    cause = exc.__cause__ or exc
                if not (isinstance(exc, ResultsStoreError) or _is_disconnect(cause)):
                    raise
                self._drop_conn()
                if time.monotonic() > deadline:
                    raise
                log.warning(
                    "%s: PostgreSQL unreachable (%s); retrying in %.1f s",
                    what,
                    _scrub(str(exc), self.url),
                    delay,
                )
                time.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(5.0, delay * 2)

    def write_chunk(
        self, job_id: str, model: str, first: int, records: Sequence[ResultDict]
    ) -> None:
        """Insert (or replace) the chunk's rows in one statement."""
        import json

        cols: dict[str, list[Any]] = {
            k: []
            for k in (
                "position",
                "source",
                "top1_index",
                "top1_label",
                "top1_score",
                "top5",
                "error_code",
                "error_message",
            )
        }
        for i, record in enumerate(records):
            top5 = record.get("top5") or []
            error = record.get("error") or None
            best = top5[0] if top5 else None
            cols["position"].append(first + i)
            cols["source"].append(record["image"])
            cols["top1_index"].append(best["index"] if best else None)
            cols["top1_label"].append(best["label"] if best else None)
            cols["top1_score"].append(best["score"] if best else None)
            cols["top5"].append(json.dumps(top5))
            cols["error_code"].append(error["code"] if error else None)
            cols["error_message"].append(error["message"] if error else None)
        params = {"job": job_id, "model": model, **cols}
        self._patiently(
            lambda conn: conn.execute(_INSERT, params, prepare=True),
            f"storing {len(records)} results of job {job_id} model {model}",
        )

    def iter_records(self, job: JobRecord) -> Iterator[ResultRecord]:
        """The job's rows in position order, through a server-side cursor."""
        self.check()
        conn = self.connect()
        try:
            with conn.transaction(), conn.cursor(name=f"imgq_read_{job.job_id}") as cur:
                cur.itersize = PG_FETCH_ROWS
                cur.execute(_SELECT, (job.job_id,))
                job_id = job.job_id
                while rows := cur.fetchmany(PG_FETCH_ROWS):
                    with gc_paused():
                        batch = [_row_record(job_id, row) for row in rows]
                    yield from batch
        finally:
            conn.close()

    def count(self, job_id: str) -> int:
        """Rows stored for a job."""
        self.check()
        row = (
            self._conn()
            .execute("SELECT count(*) FROM imgq_results WHERE job_id = %s", (job_id,))
            .fetchone()
        )
        return int(row[0]) if row else 0

    def delete_job(self, job: JobRecord) -> int:
        """Delete the job's rows."""
        return self.delete_rows(job.job_id)

    def delete_rows(self, job_id: str) -> int:
        """Delete every row of a job id (also one whose Redis records have expired)."""
        self.check()
        cur = self._conn().execute("DELETE FROM imgq_results WHERE job_id = %s", (job_id,))
        return int(cur.rowcount)

    def close(self) -> None:
        """Close this thread's connection."""
        self._drop_conn()


def _row_record(job_id: str, row: tuple[Any, ...]) -> ResultRecord:
    _position, model, source, top5, code, message = row
    error = f',"error":{{"code":{_js(code)},"message":{_js(message)}}}' if code else ""
    # One JSON document per row, validated in one pass by pydantic-core.
    return _RECORD.validate_json(
        f'{{"job_id":{_js(job_id)},"image":{_js(source)},"model":{_js(model)},'
        f'"top5":{top5}{error}}}'
    )


def _js(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


# --- choosing one ----------------------------------------------------------------------
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
    """Delete a job's Redis records (job hash, chunks, finished tasks, delivery
    bookkeeping); how many keys went."""
    keys = [f"imgq:job:{job.job_id}{s}" for s in ("", ":chunks", ":done")]
    for model in job.models:
        for index in range(job.n_chunks):
            keys.extend(attempt_keys(task_id(job.job_id, model, index)))
    deleted = 0
    for start in range(0, len(keys), _MGET_BATCH):
        deleted += int(jobs.client.delete(*keys[start : start + _MGET_BATCH]))
    # Out of the job listing (imgq jobs) and the sweep's open jobs, with its state.
    pipe = jobs.client.pipeline(transaction=False)
    pipe.zrem(JOB_INDEX_KEY, job.job_id)
    pipe.zrem(OPEN_JOBS_KEY, job.job_id)
    pipe.delete(f"imgq:sweep:{job.job_id}")
    pipe.execute()
    return deleted


def failed_chunk_records(
    job_id: str, model: str, refs: Sequence[ImageRef], reason: str
) -> list[ResultDict]:
    """``task_failed`` records for every image of a chunk that failed for good."""
    message = f"the task failed after its retries: {reason}"
    return [error_result(job_id, ref.src, model, ErrorCode.TASK_FAILED, message) for ref in refs]

"""One row per image and model in PostgreSQL's ``imgq_results`` table
(``IMGQ_RESULTS_URL=postgresql://...``)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import TypeAdapter

from shared.contract import ResultDict
from shared.jobs import JobRecord
from shared.results_store.base import ResultsSchemaError, ResultsStoreError, gc_paused
from shared.schemas import ResultRecord

log = logging.getLogger(__name__)

# Rows fetched per round trip from PostgreSQL's server-side cursor.
PG_FETCH_ROWS = 5000
# How long a worker keeps retrying a write while PostgreSQL is away (a restart).
PG_PATIENCE_S = 120.0


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
        embedded = any("embedding" in r for r in records)

        def write(conn: Any) -> None:
            if embedded:  # the vectors first: a chunk counts as stored once its rows are in
                from shared.vectors import VectorStoreError

                try:
                    self.vectors.write_records(job_id, model, first, records)
                except VectorStoreError as exc:  # retried like the rows while the server is away
                    raise ResultsStoreError(str(exc)) from exc.__cause__
            conn.execute(_INSERT, params, prepare=True)

        self._patiently(write, f"storing {len(records)} results of job {job_id} model {model}")

    @property
    def vectors(self) -> Any:
        """The embedding models' vectors, in the same database (``shared.vectors``)."""
        found = getattr(self, "_vectors", None)
        if found is None:
            from shared.vectors import VectorStore

            found = self._vectors = VectorStore(self.url)
        return found

    def iter_records(self, job: JobRecord) -> Iterator[ResultRecord]:
        """The job's rows in position order, through a server-side cursor; an embedding
        model's rows with their vectors (``embedding``, ``dim``)."""
        from shared.vectors import existing_sets, results_with_vectors_sql

        self.check()
        conn = self.connect()
        try:
            sets = existing_sets(conn, job.job_id)
            dims = {s.model: s.dim for s in sets}
            select = results_with_vectors_sql("imgq_results", sets) if sets else _SELECT
            with conn.transaction(), conn.cursor(name=f"imgq_read_{job.job_id}") as cur:
                cur.itersize = PG_FETCH_ROWS
                cur.execute(select, (job.job_id,))
                job_id = job.job_id
                while rows := cur.fetchmany(PG_FETCH_ROWS):
                    with gc_paused():
                        batch = [_row_record(job_id, row, dims) for row in rows]
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
        """Delete every row of a job id (also one whose Redis records have expired), and
        its vectors."""
        from shared.vectors import existing_sets

        self.check()
        cur = self._conn().execute("DELETE FROM imgq_results WHERE job_id = %s", (job_id,))
        if existing_sets(self._conn(), job_id):
            self.vectors.delete_job(job_id)
        return int(cur.rowcount)

    def close(self) -> None:
        """Close this thread's connection."""
        self._drop_conn()


def _row_record(
    job_id: str, row: tuple[Any, ...], dims: dict[str, int] | None = None
) -> ResultRecord:
    _position, model, source, top5, code, message, *vector = row
    error = f',"error":{{"code":{_js(code)},"message":{_js(message)}}}' if code else ""
    # pgvector's text form of a vector is a JSON array.
    embedding = (
        f',"embedding":{vector[0]},"dim":{(dims or {})[model]}' if vector and vector[0] else ""
    )
    # One JSON document per row, validated in one pass by pydantic-core.
    return _RECORD.validate_json(
        f'{{"job_id":{_js(job_id)},"image":{_js(source)},"model":{_js(model)},'
        f'"top5":{top5}{embedding}{error}}}'
    )


def _js(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)

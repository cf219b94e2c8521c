"""A worker whose stores refuse writes pauses instead of failing images or exiting.

Redis at ``maxmemory`` (``noeviction``: every write that could grow memory fails
with ``OOM command not allowed``), a Redis that refuses writes otherwise (a replica,
``MISCONF``, ``NOREPLICAS``) or is away, a PostgreSQL server that is down or whose
disk is full: none of these says anything about the images. So a write that fails
for such a reason is not an error of the task: the task keeps its results in memory
and tries the write again, with backoff, until it succeeds (:meth:`StoreGate.write`).
Meanwhile the worker takes no new task (it stops consuming its queues), logs what is
wrong once a minute, shows it in ``imgq_store_unavailable`` (worker metrics) and in
``imgq workers`` (its heartbeat's info), and resumes consuming by itself once the
writes succeed again.

What is kept in memory is bounded by what the worker holds: at most one chunk's
records per task thread (``IMGQ_WORKER_CONCURRENCY``), since no task is taken
while paused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import bootsteps
from celery.worker.consumer import Consumer
from celery.worker.state import maybe_shutdown
from kombu.exceptions import OperationalError

from workers import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# While paused, what is wrong is logged at most this often.
LOG_EVERY_S = 60.0
# A refused write is tried again after this long at first, then twice as long each
# time, up to MAX_BACKOFF_S: the worker resumes within seconds once writes succeed.
FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0

# Redis error replies that say "no writes now", whatever the command.
_REFUSALS = ("OOM ", "READONLY ", "MISCONF ", "NOREPLICAS ")


def unavailable(exc: BaseException) -> tuple[str, str] | None:
    """(store, reason) when ``exc`` says a store cannot take writes now (full, read-only,
    down, unreachable); None for any other error, which a retry cannot cure."""
    from shared.results_store import ResultsSchemaError, ResultsStoreError

    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:  # the error and its causes
        seen.add(id(err))
        found = _classify(err, ResultsStoreError, ResultsSchemaError)
        if found is not None:
            return found
        err = err.__cause__ or err.__context__
    return None


def _classify(exc: BaseException, store_error: type, schema_error: type) -> tuple[str, str] | None:
    text = " ".join(str(exc).split())
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in text:
        return "redis", (
            "Redis is at maxmemory and refuses writes (free memory, raise maxmemory, or use "
            "the PostgreSQL results store)"
        )
    if isinstance(exc, redis.exceptions.ResponseError) and text.startswith(_REFUSALS):
        return "redis", f"Redis refuses writes ({text})"
    if isinstance(
        exc,
        redis.exceptions.ConnectionError
        | redis.exceptions.TimeoutError
        | redis.exceptions.BusyLoadingError
        | OperationalError,
    ):
        return "redis", f"Redis unreachable ({text})"
    if isinstance(exc, schema_error):
        return None
    if isinstance(exc, store_error):  # one line, password removed (shared.results_store)
        return "postgresql", f"PostgreSQL unreachable: {text}"
    return _postgres(exc, text)


def _postgres(exc: BaseException, text: str) -> tuple[str, str] | None:
    try:
        import psycopg
    except ImportError:
        return None
    if not isinstance(exc, psycopg.Error):
        return None
    state = getattr(exc, "sqlstate", None) or ""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or state.startswith(
        ("08", "57P")
    ):
        return "postgresql", f"PostgreSQL unreachable ({text})"
    if state.startswith("53"):  # insufficient resources: disk full, out of memory, ...
        return "postgresql", f"PostgreSQL refuses writes ({text})"
    return None


class StoreGate:
    """Whether this worker's writes go through; pauses consuming while they do not.

    A failing write marks its store down (with who saw it: the tasks, or the
    heartbeat); the same writer's next success marks it up. The worker consumes
    while nothing is down.
    """

    def __init__(self, *, log_every_s: float = LOG_EVERY_S) -> None:
        self.log_every_s = log_every_s
        self._down: dict[tuple[str, str], str] = {}  # (store, seen by) -> reason
        self._since = 0.0
        self._last_log = 0.0
        self._waiting = 0  # task writes waiting now
        self._consumer: Any = None
        self._queues: list[str] = []  # the queues the worker consumes when not paused
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- state --------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        """True while some store refuses writes."""
        return bool(self._down)

    def describe(self) -> str | None:
        """What is wrong, in one line; None when every write goes through."""
        with self._lock:
            reasons = list(dict.fromkeys(self._down.values()))
        return "; ".join(reasons) or None

    def down(self, store: str, by: str, reason: str) -> None:
        """A write to ``store`` by ``by`` ("tasks", "heartbeat") was refused for ``reason``."""
        now = time.monotonic()
        with self._lock:
            first = not self._down
            stores_before = {s for s, _ in self._down}
            self._down[(store, by)] = reason
            if first:
                self._since = now
            due = first or now - self._last_log >= self.log_every_s
            if due:
                self._last_log = now
            waiting = self._waiting
        if store not in stores_before:
            metrics.record_store_unavailable(store, True)
        if first:
            log.warning(
                "imgq worker paused: %s; it takes no new task until writes succeed again "
                "(results already computed are kept and written then)",
                reason,
            )
            self._pause()
        elif due:
            log.warning(
                "imgq worker paused for %.0f s: %s; %d task(s) wait to store their results",
                now - self._since,
                self.describe(),
                waiting,
            )

    def up(self, store: str, by: str) -> None:
        """A write to ``store`` by ``by`` went through."""
        if (store, by) not in self._down:  # the common case: no lock
            return
        with self._lock:
            if self._down.pop((store, by), None) is None:
                return
            still = {s for s, _ in self._down}
            resumed = not self._down
            since = self._since
        if store not in still:
            metrics.record_store_unavailable(store, False)
        if resumed:
            log.warning(
                "imgq worker resumed: writes succeed again after %.0f s paused",
                time.monotonic() - since,
            )
            self._resume()

    # -- writes -------------------------------------------------------------------
    def write(self, action: Callable[[], T], what: str) -> T:
        """Run a write; while its store refuses it (full, read-only, down), pause the
        worker and try again with backoff until it succeeds. Other errors propagate."""
        delay = FIRST_BACKOFF_S
        store: str | None = None
        try:
            while True:
                try:
                    result = action()
                except Exception as exc:
                    found = unavailable(exc)
                    if found is None:
                        raise
                    if store is None:
                        with self._lock:
                            self._waiting += 1
                    store, reason = found
                    self.down(store, "tasks", f"{what}: {reason}")
                    log.debug("%s: %s; trying again in %.1f s", what, reason, delay)
                    if self._stop.wait(delay):
                        raise
                    delay = min(MAX_BACKOFF_S, delay * 2)
                    continue
                if store is not None:
                    self.up(store, "tasks")
                return result
        finally:
            if store is not None:
                with self._lock:
                    self._waiting -= 1

    def stop(self) -> None:
        """Stop waiting: writes still refused raise (the worker is stopping)."""
        self._stop.set()

    # -- consuming ----------------------------------------------------------------
    def attach(self, consumer: Any) -> None:
        """The worker's consumer (each time it starts); paused at once if need be."""
        with self._lock:
            self._consumer = consumer
            if not self._queues:
                self._queues = list(consumer.app.amqp.queues.consume_from)
        self._pause()

    def _pause(self) -> None:
        self._schedule()

    def _resume(self) -> None:
        self._schedule()

    def _schedule(self) -> None:
        """Have the consumer's thread bring its queues in line with the state. The
        callbacks may run in any order: each one applies the state of its own time."""
        consumer = self._consumer
        if consumer is not None:
            consumer.call_soon(self._apply, consumer)

    def _apply(self, consumer: Any) -> None:
        """On the consumer's thread: consume the worker's queues unless paused."""
        tasks = getattr(consumer, "task_consumer", None)
        if tasks is None:
            return
        paused = self.paused
        for queue in self._queues:
            try:
                consuming = tasks.consuming_from(queue)
                if paused and consuming:
                    consumer.cancel_task_queue(queue)
                elif not paused and not consuming:
                    consumer.add_task_queue(queue)
            except Exception as exc:  # a lost connection: the consumer restarts
                log.warning("queue %s: %s", queue, exc)


_gate = StoreGate()


def store_gate() -> StoreGate:
    """This worker process's gate."""
    return _gate


class PatientConsumer(Consumer):
    """Celery's consumer, which waits while Redis refuses writes instead of exiting,
    and survives losing the broker while it holds deliveries.

    Connecting runs kombu's restore of timed-out deliveries, which takes a lock in
    Redis (a write): against a full Redis that fails, and Celery would stop the
    worker ("Unrecoverable error"). Here the worker waits, paused, and connects once
    Redis takes writes again. The same happens when the consumer reconnects after a
    refused write while running (``broker_channel_error_retry``).
    """

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Celery's handling of a lost broker connection, after which the connection's
        channel can still reach Redis.

        Celery collects the lost connection, which detaches its transport from it,
        then closes it. A channel that lost its connection under a pending BRPOP is
        still open at that close, and the deliveries it holds unacknowledged (a batch
        waiting for more images) are restored, and later acknowledged by their
        tasks, through clients built from that transport's connection: with it
        detached, each raised ``AttributeError``, which Celery does not expect, and
        the worker exited ("Unrecoverable error") whenever Redis restarted or failed
        over under it. Here the transport keeps its connection: the restore and the
        acknowledgements reach Redis again, or fail with the connection errors that
        Celery ignores (deliveries not acknowledged then go back to the queue after
        the visibility timeout).
        """
        connection = self.connection
        if connection is not None:
            connection.collect = _collect_keeping_transport(connection)
        super().on_connection_error_after_connected(exc)

    def connect(self) -> Any:
        """The broker connection, once Redis takes writes."""
        delay = FIRST_BACKOFF_S
        while True:
            conn = self.connection_for_read(heartbeat=self.amqheartbeat)
            if not self.hub:
                return conn
            try:
                conn.transport.register_with_event_loop(conn.connection, self.hub)
            except Exception as exc:
                found = unavailable(exc)
                if found is None or found[0] != "redis":
                    raise
                _gate.down("redis", "consumer", found[1])
                try:
                    conn.release()
                except Exception:  # the connection is dropped either way
                    log.debug("releasing a refused connection failed", exc_info=True)
                maybe_shutdown()
                time.sleep(delay)
                maybe_shutdown()
                delay = min(MAX_BACKOFF_S, delay * 2)
                continue
            _gate.up("redis", "consumer")
            return conn


def _collect_keeping_transport(connection: Any) -> Callable[..., None]:
    """``connection.collect``, after which its transport still belongs to ``connection``."""
    collect = connection.collect
    transport = connection._transport

    def collect_keeping_transport(*args: Any, **kwargs: Any) -> None:
        try:
            collect(*args, **kwargs)
        finally:
            if transport is not None:
                transport.client = connection

    return collect_keeping_transport


class AttachConsumer(bootsteps.StartStopStep):
    """A consumer step: each time the consumer starts, the gate gets it (and pauses it
    at once while a store refuses writes)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        """Hand the consumer to the gate."""
        _gate.attach(c)

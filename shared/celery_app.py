"""Builds the Celery app from settings. Producers and workers share this wiring;
tasks live in ``workers.tasks`` and are sent by name, so producers never import
TensorFlow."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import before_task_publish
from kombu import Queue

from shared.jobs import AttemptStore, JobStore
from shared.priority import PRIORITY_STEPS
from shared.settings import Settings, get_settings

CLASSIFY_TASK = "imgq.classify"
DEFAULT_QUEUE = "imgq.default"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting imgq relies on, explicit and with the reason for it."""
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.backend_url,
        # JSON only: a pickled message could run code on the worker. Anything
        # else is rejected by kombu before it reaches a task.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Acknowledge a task after it ran, not when it was received, so a task
        # whose worker dies stays in Redis as unacknowledged instead of being lost:
        # the workers' heartbeats (shared/liveness.py) put it back on its queue once
        # its worker's heartbeat has expired. A worker lost mid-task (SIGKILL, OOM)
        # requeues it rather than failing it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Tasks are long (a model call on a whole chunk): take one at a time per
        # pool slot, so idle workers, not busy ones, get the next chunk.
        "worker_prefetch_multiplier": 1,
        # A dead worker's tasks come back through the heartbeats, within seconds
        # (shared/liveness.py). The visibility timeout is the backstop behind them:
        # kombu redelivers a task taken but not acknowledged after this long even
        # when no live worker or producer recovered it; it must exceed the longest
        # task, or a slow task runs twice (see docs/operations.md).
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            # Look for messages past the visibility timeout every few seconds
            # rather than every 100, so the backstop acts within about
            # visibility_timeout + this interval.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
            # A bounded connect: after a Sentinel failover the dead master's
            # address fails in seconds, not the operating system's minutes, and the
            # next try asks the sentinels again (kombu gives the sentinels the same
            # timeout). Reads stay unbounded: a worker's BRPOP waits on purpose.
            "socket_connect_timeout": settings.redis_connect_timeout,
            **_sentinel_options(settings.broker_url, settings),
            # A Redis list per job priority level (shared/priority.py): a worker
            # takes the next task of the most urgent job waiting for its models.
            "priority_steps": PRIORITY_STEPS,
        },
        "result_backend_transport_options": _sentinel_options(
            settings.backend_url, settings, sentinel_kwargs=True
        ),
        # The job records, the heartbeats' claims and the results live on this
        # connection: the same bounded connect as the broker's.
        "redis_socket_connect_timeout": settings.redis_connect_timeout,
        # Result writes retry through a Redis restart (about a minute at most).
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        "result_backend_base_sleep_between_retries_ms": 50,
        "result_backend_max_sleep_between_retries_ms": 5000,
        # On a lost broker connection, running tasks finish (threads cannot be
        # cancelled); their acknowledgement is lost with the connection. The worker
        # drops its claims on them when it reconnects (workers/liveness.py), so they
        # are put back on their queues like a dead worker's, after the heartbeat
        # timeout; a rerun of a task that had finished is acknowledged without
        # running (its id is in the job's done hash), and one that had not writes
        # the same result under the same task id.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # Task events for Flower: sent, started, succeeded, failed, retried.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        # Results expire with the job records (IMGQ_RESULT_EXPIRES).
        "result_expires": settings.result_expires,
        # Every model has its own queue (imgq.<model>, chosen when a task is
        # sent); anything else lands on the default queue.
        "task_default_queue": DEFAULT_QUEUE,
        "task_queues": [Queue(DEFAULT_QUEUE)],
        "task_create_missing_queues": True,
        # TensorFlow does not survive fork(): workers run a thread pool in the
        # process that loaded the models (or solo). Prefork is refused at start.
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "enable_utc": True,
    }


def _sentinel_options(
    url: str, settings: Settings, *, sentinel_kwargs: bool = False
) -> dict[str, Any]:
    """Transport options a ``sentinel://`` URL needs (the master's name); none otherwise.

    ``sentinel_kwargs``: also the connect timeout for the sentinels themselves (Celery's
    result backend gives them none of its own options; kombu gives them its own).
    """
    if not url.startswith("sentinel"):
        return {}
    # Sentinels are asked for the current master on every (re)connection, so a
    # failover moves workers and producers to the promoted replica.
    options: dict[str, Any] = {"master_name": settings.sentinel_master}
    if sentinel_kwargs:
        options["sentinel_kwargs"] = {"socket_connect_timeout": settings.redis_connect_timeout}
    return options


def _drop_repeated_reprs(sender: Any = None, properties: Any = None, **_: Any) -> None:
    """Keep a classify task's ``argsrepr`` and ``kwargsrepr`` in its headers only.

    Celery hands ``send_task``'s extra options to the publish call as message
    properties, so the two summaries, already in the headers where the worker and
    Flower read them, were stored a second time in every queued message (about a
    tenth of its bytes, which a million-image job pays 31,250 times).
    """
    if sender == CLASSIFY_TASK and isinstance(properties, dict):
        properties.pop("argsrepr", None)
        properties.pop("kwargsrepr", None)


before_task_publish.connect(_drop_repeated_reprs, weak=False)


def create_app(settings: Settings | None = None, *, include: list[str] | None = None) -> Celery:
    """A Celery app configured from ``settings`` (read from the environment when omitted).

    The configuration is read when the app is first used, not at import time, so
    importing ``workers.app`` never fails on a bad environment.
    """
    app = Celery("imgq", include=include or [])
    app.add_defaults(lambda: celery_config(settings or get_settings()))
    return app


def job_store_for(app: Celery) -> JobStore:
    """The job store on the result backend's Redis connection pool."""
    client = getattr(app.backend, "client", None)
    if client is None:
        raise RuntimeError(
            f"imgq keeps job records in Redis; the result backend {app.conf.result_backend!r} "
            "is not a Redis URL (set IMGQ_RESULT_BACKEND to redis://, rediss:// or sentinel://)"
        )
    return JobStore(client, ttl=int(app.conf.result_expires))


def attempt_store_for(app: Celery) -> AttemptStore:
    """The per-task delivery bookkeeping, next to the job records."""
    return AttemptStore(job_store_for(app).client, ttl=int(app.conf.result_expires))

"""Worker start and stop: load the models before anything is consumed, refuse fork.

Which models a worker serves: its ``--model`` options (``workers.options``), else
``IMGQ_WORKER_MODELS``, else the model queues given with ``-Q imgq.<model>``. Either way the worker
consumes exactly the queues of the models it loaded.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any

from celery.signals import celeryd_after_setup, worker_init, worker_shutdown

from shared.notify import stop_sending
from shared.registry import model_from_queue, queue_for
from shared.settings import Settings, get_settings
from workers import metrics
from workers.classifier import ModelLoadError
from workers.liveness import start_heartbeat, stop_heartbeat
from workers.options import worker_options
from workers.runtime import Runtime
from workers.state import get_runtime, set_runtime
from workers.store_health import store_gate

log = logging.getLogger(__name__)

FORK_POOLS = {"prefork", "processes"}


def _settings() -> Settings:
    """This worker's settings: the environment's, with its command-line options applied."""
    return worker_options().apply(get_settings())


def _models_for(worker: Any, settings: Settings) -> list[str]:
    queues = worker.app.amqp.queues
    if settings.worker_models:
        models = list(dict.fromkeys(settings.worker_models))
        # Serve exactly the models' queues.
        for name in list(queues.consume_from or {}):
            queues.deselect(name)
        for model in models:
            queues.select_add(queue_for(model))
        return models
    selected = list((queues.consume_from or {}).keys())
    models = [m for m in (model_from_queue(q) for q in selected) if m]
    return list(dict.fromkeys(models))


def asked_for_fork(argv: list[str]) -> bool:
    """True when the command line names a fork pool (``-P prefork``, ``--pool=processes``).

    Celery takes ``-P prefork`` for its default and quietly replaces it with the
    configured pool (threads), so the pool the worker gets cannot tell."""
    for i, arg in enumerate(argv):
        if arg in ("-P", "--pool") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--pool="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-P") and len(arg) > 2:
            value = arg[2:]
        else:
            continue
        if value.lower() in FORK_POOLS:
            return True
    return False


@worker_init.connect
def refuse_fork(sender: Any = None, **_: Any) -> None:
    """Stop at once when a fork pool was asked for, before the models load."""
    pool = sender.pool_cls
    name = pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__name__}"
    if name.lower() in FORK_POOLS or "prefork" in name or asked_for_fork(sys.argv):
        _fail(
            "the prefork pool forks after the models load, and TensorFlow does not survive "
            "fork(); run workers with --pool threads (the default) or --pool solo, one process "
            "per GPU"
        )


@celeryd_after_setup.connect
def load_models(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Load every model of this worker in this process, before consuming starts.

    This signal comes after logging is set up and ``-Q`` applied, and before the
    consumer starts: no task arrives before the models are ready.
    """
    # One INFO line per fetched URL is noise at bulk scale; botocore's DEBUG lines
    # carry request headers (signatures), never wanted in a worker's log.
    for name in ("httpx", "httpcore", "botocore", "boto3", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _check_broker(instance.app)
    try:
        settings = _settings()
        _serve_metrics(settings)
        runtime = Runtime.start(_models_for(instance, settings), settings)
    except ModelLoadError as exc:
        _fail(str(exc))
    from shared.celery_app import job_store_for
    from shared.heads import HeadCache, HeadStore

    # Heads of your own labels are read from the job store when a task names one.
    runtime.heads = HeadCache(HeadStore(job_store_for(instance.app).client))
    set_runtime(runtime)
    # Alive (and recovering others' work) from before the first task arrives.
    start_heartbeat(
        instance.app,
        instance.hostname,
        list(runtime.classifiers),
        list(instance.app.amqp.queues.consume_from),
        _settings(),
    )
    # TensorFlow and the models leave millions of long-lived Python objects;
    # moving them out of the collector's sight keeps full collections, which the
    # per-image records trigger, from traversing them again and again.
    gc.collect()
    gc.freeze()
    _mark_ready(settings)
    log.info(
        "imgq worker serving %s on queues %s",
        ", ".join(runtime.classifiers),
        ", ".join(instance.app.amqp.queues.consume_from),
    )


def _mark_ready(settings: Settings) -> None:
    """Create IMGQ_READY_FILE: the models are loaded and warm, tasks are taken from now
    on (Kubernetes' startup probe waits for it)."""
    global _ready_file
    if settings.ready_file is None:
        return
    path = settings.ready_file.expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{os.getpid()}\n", encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write IMGQ_READY_FILE {path}: {exc}")
    _ready_file = path


_ready_file: Path | None = None


def _check_broker(app: Any) -> None:
    """Stop at once when Redis refuses the URL's database, before the models load (a
    Redis not up yet is waited for, as Celery does)."""
    import redis

    from shared.celery_app import job_store_for

    try:
        job_store_for(app).client.ping()
    except redis.exceptions.ResponseError as exc:
        _fail(f"Redis refuses IMGQ_BROKER_URL / IMGQ_RESULT_BACKEND: {exc}")
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return


def _serve_metrics(settings: Settings) -> None:
    """Serve /metrics when a port is set; before the models load, so that a port in
    use stops the worker at once."""
    if not settings.worker_metrics_port:
        return
    addr, port = settings.worker_metrics_addr, settings.worker_metrics_port
    try:
        metrics.serve(addr, port)
    except OSError as exc:
        _fail(f"cannot serve metrics on {addr}:{port} (IMGQ_WORKER_METRICS_PORT): {exc}")


@worker_shutdown.connect
def release(**_: Any) -> None:
    """Stop the heartbeat and close the runtime when the worker stops; completion
    callbacks still being tried are left to other processes."""
    store_gate().stop()
    if _ready_file is not None:
        _ready_file.unlink(missing_ok=True)
    stop_sending()
    stop_heartbeat()
    try:
        get_runtime().close()
    except RuntimeError:
        return
    set_runtime(None)


def _fail(message: str) -> None:
    log.critical("imgq worker cannot start: %s", message)
    print(f"imgq worker cannot start: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)

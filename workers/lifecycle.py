"""Worker start and stop: load the models before anything is consumed, refuse fork.

Which models a worker serves: its ``--model`` options (``workers.options``), else
``IMGQ_WORKER_MODELS``, else the model queues given with ``-Q imgq.<model>``. Either way the worker
consumes exactly the queues of the models it loaded.
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any

from celery.signals import celeryd_after_setup, worker_init, worker_shutdown

from shared.registry import model_from_queue, queue_for
from shared.settings import Settings, get_settings
from workers import metrics
from workers.classifier import ModelLoadError
from workers.liveness import start_heartbeat, stop_heartbeat
from workers.options import worker_options
from workers.runtime import Runtime
from workers.state import get_runtime, set_runtime

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


@worker_init.connect
def refuse_fork(sender: Any = None, **_: Any) -> None:
    """Stop at once when the pool would fork after the models load."""
    pool = sender.pool_cls
    name = pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__name__}"
    if name.lower() in FORK_POOLS or "prefork" in name:
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
    # One INFO line per fetched URL is noise at bulk scale.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        settings = _settings()
        _serve_metrics(settings)
        runtime = Runtime.start(_models_for(instance, settings), settings)
    except ModelLoadError as exc:
        _fail(str(exc))
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
    log.info(
        "imgq worker serving %s on queues %s",
        ", ".join(runtime.classifiers),
        ", ".join(instance.app.amqp.queues.consume_from),
    )


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
    """Stop the heartbeat and close the runtime when the worker stops."""
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

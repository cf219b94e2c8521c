"""The worker's Celery app: ``celery -A workers.app worker`` and ``celery -A workers.app flower``.

This module only builds the app; tasks live in ``workers.tasks`` and the model
lifecycle (load before consuming) in ``workers.lifecycle``.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from shared.celery_app import create_app, job_store_for
from shared.jobs import JobStore
from shared.settings import SettingsError, get_settings
from workers.options import add_worker_options
from workers.tf_allocator import prefer_bfc

# TensorFlow's GPU build logs "failed call to cuInit" as an error at every start on a
# host without an NVIDIA GPU; there, its C++ log is kept to fatal errors unless
# TF_CPP_MIN_LOG_LEVEL says otherwise (before TensorFlow loads, which reads it once).
if "TF_CPP_MIN_LOG_LEVEL" not in os.environ and not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

# Batches reuse TensorFlow's CPU memory instead of mapping it afresh at every call
# (workers.tf_allocator), unless TF_CPU_ALLOCATOR_USE_BFC says otherwise.
prefer_bfc()

try:  # a bad setting is one line and exit 2, before Celery or a model starts
    get_settings()
except SettingsError as _exc:
    print(f"imgq worker cannot start: {_exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None

app = create_app(include=["workers.tasks", "workers.lifecycle", "workers.results"])
app.conf.update(
    # A Redis that refuses writes (full) makes the consumer's own bookkeeping
    # fail with an error reply, which Celery takes for an unrecoverable channel
    # error and exits: here the consumer reconnects instead, and its connect
    # waits until Redis takes writes again (workers.store_health).
    broker_channel_error_retry=True,
    worker_consumer="workers.store_health:PatientConsumer",
)
add_worker_options(app)
app.steps["consumer"].add("workers.liveness:ReleaseOnReconnect")
app.steps["consumer"].add("workers.store_health:AttachConsumer")


@lru_cache(maxsize=1)
def job_store() -> JobStore:
    """The job store this worker writes its bookkeeping to."""
    return job_store_for(app)

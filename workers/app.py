"""The worker's Celery app: ``celery -A workers.app worker`` and ``celery -A workers.app flower``.

This module only builds the app; tasks live in ``workers.tasks`` and the model
lifecycle (load before consuming) in ``workers.lifecycle``.
"""

from __future__ import annotations

from functools import lru_cache

from shared.celery_app import create_app, job_store_for
from shared.jobs import JobStore
from workers.options import add_worker_options

app = create_app(include=["workers.tasks", "workers.lifecycle", "workers.results"])
add_worker_options(app)
app.steps["consumer"].add("workers.liveness:ReleaseOnReconnect")


@lru_cache(maxsize=1)
def job_store() -> JobStore:
    """The job store this worker writes its bookkeeping to."""
    return job_store_for(app)

"""The search index of an embedding job, built when the job finishes: the worker that
records the job's last task starts the build in a thread of its own, so the first
``imgq similar`` or ``imgq duplicates`` does not wait for it (it builds the index
itself when it comes first)."""

from __future__ import annotations

import logging
import threading

from shared import keys
from shared.contract import parse_task_id
from shared.jobs import JobStore
from workers.runtime import Runtime

log = logging.getLogger(__name__)


def index_if_ended(
    store: JobStore, runtime: Runtime, results_url: str, task_id: str
) -> threading.Thread | None:
    """When ``task_id`` was the last task of its job and its model is an embedding
    model, start building the index of the job's vectors; the thread, else None.

    Workers that see the end together build it once (``VectorStore.build_index``
    takes a lock and finds it built). Never raises.
    """
    try:
        job_id, model, _ = parse_task_id(task_id)
        batcher = runtime.batchers.get(model)
        if batcher is None or not batcher.classifier.spec.is_embedding:
            return None  # classifiers: nothing more than this check per task
        record = store.get(job_id)
        if store.client.hlen(keys.job_done(job_id)) < record.n_chunks * len(record.models):
            return None
    except Exception:
        log.exception("could not tell whether job of task %s ended", task_id)
        return None

    def build() -> None:
        from shared.vectors import VectorStore

        vectors = VectorStore(results_url)
        try:
            if vectors.get_set(job_id, model) is None:
                return  # no image of the job had a vector
            vectors.build_index(job_id, model)
        except Exception:
            log.exception("could not build the index of job %s model %s", job_id, model)
        finally:
            vectors.close()

    thread = threading.Thread(target=build, name=f"imgq-index-{job_id}", daemon=True)
    thread.start()
    return thread

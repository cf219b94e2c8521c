"""Streaming submit: a job's sources are listed, chunked, recorded and queued in
bounded batches, so the producer's memory does not grow with the job and workers
start on the first chunks while the listing goes on.

The job is recorded in its "listing" state as soon as its first chunk is full
(``JobStore.begin``); each batch of chunks is appended with the job's counts in one
step (``JobStore.append``) and its tasks are sent right after, so a worker never
gets a task whose chunk is not recorded. Batches start at one chunk and double up
to ``MAX_BATCH`` chunks, and a batch waits at most ``MAX_DELAY_S`` for more: the
first task is queued within milliseconds of the first chunk, and a long listing
costs one Redis round trip per thousand chunks. The job's totals are final when the
listing ends (``JobStore.end_listing``). A listing that fails part-way (an
unreadable manifest line, a folder that vanished, an interrupt) ends with its error
kept in the record and the job cancelled: its queued tasks are taken off the queues
and its completion callback says so. The listing's lease is renewed from a thread;
if this process dies, the lease lapses and the workers' sweep gives the listing up
the same way.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import redis

from shared import keys, open_jobs
from shared.jobctl import purge_queued
from shared.jobs import JobRecord, ListingStopped, encode_chunk
from shared.kombu_redis import batched_producer
from shared.notify import notify_job_end, track_due
from shared.schemas import ImageRef

if TYPE_CHECKING:
    from producer.api import Client, Job

log = logging.getLogger(__name__)

# Chunks per batch at most (one script call, then their tasks), and the longest a
# listed chunk waits for its batch to fill.
MAX_BATCH = 1000
MAX_DELAY_S = 0.25


def submit_streaming(
    client: Client,
    refs: Iterator[ImageRef],
    *,
    models: Sequence[str],
    job_id: str,
    chunk_size: int,
    name: str,
    priority: int,
    notify: str | None,
    routes: dict[str, str] | None = None,
) -> Job:
    """Record job ``job_id`` and queue its tasks as ``refs`` are listed; the job's
    handle once the listing has ended. A ValueError when ``refs`` is empty (no job is
    recorded); the listing's own error (a SourceError ...) when it fails part-way,
    after the job has been marked failed and cancelled; ListingStopped when the job
    was cancelled or deleted while it was being listed."""
    from producer.api import Job, redis_full

    first = list(itertools.islice(refs, chunk_size))
    if not first:
        raise ValueError("no images to submit")
    store = client.store
    try:
        record = store.begin(
            job_id,
            models,
            chunk_size=chunk_size,
            name=name,
            priority=priority,
            notify=notify,
            results_store=client.results_store.kind,
            routes=routes,
        )
    except redis.exceptions.RedisError as exc:
        raise client.refused_error(job_id, exc) from exc
    job = Job(client, record)
    lease = _LeaseKeeper(client, job_id)
    try:
        open_jobs.track(store.client, job_id)  # swept for lost tasks until it finishes
        if notify:
            track_due(store, job_id)  # its callback is sent by someone, whoever dies
        _list(job, record, itertools.chain(first, refs))
        store.end_listing(job_id)
    except ListingStopped:
        raise  # cancelled or deleted by someone else: nothing of ours to undo
    except BaseException as exc:
        if redis_full(exc):
            # Redis at maxmemory: the submit is refused whole, nothing of the job kept
            # (deletes take no memory, so Redis allows them even when full).
            client.withdraw(job.record)
            raise client.refused_error(job_id, exc) from exc
        _fail(client, job, exc)
        raise
    finally:
        lease.stop()
    job.record = store.get(job_id)
    return job


def _list(job: Job, record: JobRecord, refs: Iterator[ImageRef]) -> None:
    """Chunk ``refs``, append the chunks in batches, send each batch's tasks."""
    store = job.client.store
    size = record.chunk_size
    batch: list[bytes] = []
    batch_images = 0
    limit = 1
    images = 0
    last = time.monotonic()
    while True:
        chunk = list(itertools.islice(refs, size))
        if chunk:
            batch.append(encode_chunk(chunk))
            batch_images += len(chunk)
        now = time.monotonic()
        if batch and (not chunk or len(batch) >= limit or now - last >= MAX_DELAY_S):
            n_chunks = store.append(record.job_id, batch, batch_images)
            images += batch_images
            job.record = dataclasses.replace(job.record, total_images=images, n_chunks=n_chunks)
            with batched_producer(job.client.app) as producer:  # one pipeline
                for index in range(n_chunks - len(batch), n_chunks):
                    for model in record.models:
                        job.send_chunk(model, index, producer=producer)
            batch, batch_images = [], 0
            limit = min(MAX_BATCH, limit * 2)
            last = time.monotonic()
        if not chunk:
            return


def _fail(client: Client, job: Job, exc: BaseException) -> None:
    """Mark the job's listing failed (the job cancelled), take its tasks off the queues
    and send its completion callback; never raises over the listing's own error."""
    job_id = job.job_id
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        reason = "interrupted"
    error = f"the listing failed after {job.record.total_images} image(s): {reason}"
    try:
        if not client.store.end_listing(job_id, error):
            return
        removed = purge_queued(client.broker.client, job.record)
        client.store.client.publish(keys.job_progress(job_id), "cancelled")
        log.warning("job %s: %s; cancelled (%d queued task(s) removed)", job_id, error, removed)
        notify_job_end(client.store, job_id, "cancelled", client.settings)
    except Exception:
        log.exception("job %s: could not record that its listing failed", job_id)


class _LeaseKeeper:
    """Renews the listing's lease every third of its length, from a thread, so that a
    source slow to yield (a network folder, a generator) does not lose it."""

    def __init__(self, client: Client, job_id: str) -> None:
        self._store = client.store
        self._job_id = job_id
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"imgq-listing-{job_id}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        every = self._store.listing_lease / 3
        while not self._stopped.wait(every):
            try:
                if not self._store.renew_listing(self._job_id):
                    return
            except Exception as exc:  # Redis away for a moment: the next try may do
                log.warning("job %s: listing lease not renewed: %s", self._job_id, exc)

    def stop(self) -> None:
        """Stop renewing (the listing has ended, or failed)."""
        self._stopped.set()
        self._thread.join(timeout=5)

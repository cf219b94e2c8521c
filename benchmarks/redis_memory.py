"""How much Redis memory a queued image and a stored result take: the sizing rule in
docs/monitoring.md.

    python benchmarks/redis_memory.py [IMAGES]

Starts a throwaway Redis, submits a job of IMAGES (default 20,000) paths of a typical
length (``/data/photos/2024/06/IMG_000123.jpg``) in chunks of 32 to one model, with
no worker: INFO memory's ``used_memory`` before and after gives the bytes per queued
image (job record, chunk lists, task messages). Then it stores, per chunk, what a
worker stores with the Redis results store (the Celery result holding the chunk's
records, each with its top-5 labels from ImageNet, and the task's field in the
job's done hash) and deletes the task messages, as acknowledging does: the bytes per
stored result. ``MEMORY USAGE`` of one key of each kind is printed too. No TensorFlow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import states

from producer.api import Client
from producer.embedded import EmbeddedRedis
from shared.contract import ok_result, task_id
from shared.labels import load_labels
from shared.priority import queue_lists
from shared.registry import queue_for
from shared.schemas import ImageRef
from shared.settings import Settings

CHUNK = 32
MODEL = "resnet50"


def used(r: object) -> int:
    return int(r.info("memory")["used_memory"])  # type: ignore[attr-defined]


def main(n: int) -> None:
    server = EmbeddedRedis().start()
    try:
        os.environ["IMGQ_BROKER_URL"] = server.url
        client = Client(Settings(broker_url=server.url))
        r = server.client()
        refs = [
            ImageRef(
                src=f"/data/photos/2024/06/IMG_{i:06d}.jpg",
                ref=f"/data/photos/2024/06/IMG_{i:06d}.jpg",
            )
            for i in range(n)
        ]
        before = used(r)
        job = client.submit(refs, models=[MODEL], chunk_size=CHUNK)
        queued = used(r) - before
        print(f"queued: {queued / n:.0f} bytes per image ({queued / 1e6:.1f} MB for {n} images)")
        print(f"  MEMORY USAGE job chunks list: {r.memory_usage(f'imgq:job:{job.job_id}:chunks')}")
        queue = queue_lists(queue_for(MODEL))
        lengths = {key: r.llen(key) for key in queue}
        print(f"  task messages: {sum(lengths.values())}")

        labels = load_labels("imagenet1k")
        backend = client.app.backend
        scores = (0.41, 0.22, 0.11, 0.05, 0.01)
        before = used(r)
        for chunk in range(job.record.n_chunks):
            tid = task_id(job.job_id, MODEL, chunk)
            records = [
                ok_result(job.job_id, ref.src, MODEL, (1 + i % 900, 2, 3, 4, 5), scores, labels)
                for i, ref in enumerate(refs[chunk * CHUNK : (chunk + 1) * CHUNK])
            ]
            backend.store_result(tid, records, states.SUCCESS)
            client.store.mark_finished(tid, ok=len(records), failed=0)
        for key in queue:
            r.delete(key)  # acknowledged: the messages are gone
        stored = used(r) - before
        print(f"stored results: {stored / n:.0f} bytes per image, net of the messages acknowledged")
        key = backend.get_key_for_task(task_id(job.job_id, MODEL, 0))
        print(f"  MEMORY USAGE one chunk's result ({CHUNK} records): {r.memory_usage(key)}")
        print(f"total after the job: {used(r) / 1e6:.1f} MB used")
    finally:
        server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)

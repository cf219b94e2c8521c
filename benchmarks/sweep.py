"""What one pass of the sweep for lost tasks costs on a long queue.

    python benchmarks/sweep.py                  # about a minute on 2 CPU cores
    python benchmarks/sweep.py --queued 10000 --stuck 5 --json out.json

A model's queue holds ``--queued`` waiting messages (100,000 by default) of a big
job, spread over the ten priority lists, and ``--stuck`` jobs (50) of 20 tasks each
have made no progress for longer than the grace period: of each, 10 tasks wait in
the queue too, 2 are delivered and unacknowledged, 8 are lost. Printed: the time of
the pass that examines the stuck jobs (it reads the queue and the deliveries, and
records the suspects) and of the next one (it sends the lost tasks again), and the
tasks sent. On a Redis of its own (``producer.embedded.EmbeddedRedis``), no worker,
in this process, with the queues compressed as imgq's Redis keeps them
(``--list-compress-depth``, 1 by default; ``0 1`` measures both, one after the other).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import free_port  # noqa: E402
from producer.embedded import LIST_COMPRESS_DEPTH  # noqa: E402

MODEL = "bench_sweep"
TASKS_PER_JOB = 20
QUEUED_PER_JOB = 10
HELD_PER_JOB = 2


def fill(app: Any, broker: Any, queued: int, stuck: int) -> None:
    """The queue, the deliveries and the stuck jobs' records."""
    from shared import keys, open_jobs
    from shared.celery_app import job_store_for
    from shared.priority import queue_lists
    from shared.registry import queue_for
    from shared.schemas import ImageRef

    queue = queue_for(MODEL)
    lists = queue_lists(queue)
    client = broker.client
    # One real message, as Celery sends it, is the template of every other.
    app.send_task("imgq.classify", args=["big", MODEL, 0, 32], task_id="template", queue=queue)
    template = json.loads(client.rpop(queue))
    store = job_store_for(app)

    def message(tid: str) -> str:
        template["headers"]["id"] = template["headers"]["root_id"] = tid
        template["properties"]["correlation_id"] = tid
        return json.dumps(template)

    pipe = client.pipeline(transaction=False)
    for i in range(queued):
        pipe.lpush(lists[i % len(lists)], message(f"big.{MODEL}.{i:06d}"))
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    chunk = [ImageRef(src="/data/a.jpg", ref="/data/a.jpg")]
    for j in range(stuck):
        job_id = f"stuck{j:03d}"
        store.create(job_id, [MODEL], [chunk] * TASKS_PER_JOB, chunk_size=1)
        open_jobs.track(store.client, job_id)
        store.client.hset(
            keys.sweep_state(job_id),
            mapping={"finished": "0", "since": repr(time.time() - 3600), "suspects": "[]"},
        )
        for i in range(QUEUED_PER_JOB):
            client.lpush(lists[5], message(f"{job_id}.{MODEL}.{i:06d}"))
        for i in range(QUEUED_PER_JOB, QUEUED_PER_JOB + HELD_PER_JOB):
            tag = f"tag-{job_id}-{i}"
            entry = json.dumps([json.loads(message(f"{job_id}.{MODEL}.{i:06d}")), queue, queue])
            client.hset("unacked", tag, entry)
            client.zadd("unacked_index", {tag: time.time()})


def measure(queued: int, stuck: int, depth: int = LIST_COMPRESS_DEPTH) -> dict[str, Any]:
    from producer.embedded import EmbeddedRedis
    from shared.celery_app import create_app
    from shared.liveness import BrokerRedis
    from shared.settings import Settings
    from workers.sweep import sweep

    server = EmbeddedRedis(None, port=free_port(), appendonly=False).start()
    try:
        server.client().config_set("list-compress-depth", depth)
        settings = Settings(broker_url=server.url, sweep_grace=1)
        app = create_app(settings)
        broker = BrokerRedis(app)
        fill(app, broker, queued, stuck)
        passes = []
        for _ in range(2):
            t = time.perf_counter()
            kwargs: dict[str, Any] = {"lock_s": 600}
            sent = sweep(app, broker, settings, by="bench", **kwargs)
            passes.append({"seconds": time.perf_counter() - t, "sent": sent})
            broker.client.delete("imgq:lock:sweep", "imgq:lock:sweep-pace")
        broker.close()
        return {"queued": queued, "stuck": stuck, "depth": depth, "passes": passes}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queued", type=int, default=100_000, help="messages in the queue")
    parser.add_argument("--stuck", type=int, default=50, help="stuck jobs")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--list-compress-depth",
        type=int,
        nargs="+",
        default=[LIST_COMPRESS_DEPTH],
        help="Redis's, per run",
    )
    args = parser.parse_args(argv)
    logging.getLogger("workers.sweep").setLevel(logging.ERROR)  # one line per job resent
    results = []
    for depth in args.list_compress_depth:
        result = measure(args.queued, args.stuck, depth)
        first, second = result["passes"]
        print(
            f"{args.queued:,} queued, {args.stuck} stuck jobs, list-compress-depth {depth}: "
            f"examining pass {first['seconds']:.2f} s, next pass {second['seconds']:.2f} s "
            f"({second['sent']} task(s) sent again; expected "
            f"{args.stuck * (TASKS_PER_JOB - QUEUED_PER_JOB - HELD_PER_JOB)})"
        )
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

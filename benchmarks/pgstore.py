"""The PostgreSQL results store against the Redis one, side by side in one run.

    python benchmarks/pgstore.py                    # 200,000-image jobs, 1,000,000-record export
    python benchmarks/pgstore.py --images 20000 --export-records 100000   # a smoke run
    python benchmarks/pgstore.py --only export --export-records 20000 --report-records 20000

Figures (a model that returns zeros, 32x32 JPEGs, one worker process, one model):

1. Redis peak ``used_memory`` growth during one job, with each store;
2. routing capacity (images/s, submit to last result) with each store, alternating runs;
3. exporting a job's records from PostgreSQL to Parquet and to JSONL through
   ``imgq results``, and drawing a job's HTML report with ``imgq report`` (image
   paths that do not exist, so no thumbnails): seconds and the producer's peak RSS;
4. bytes per record: PostgreSQL (table and indexes) and Redis (growth per record).

PostgreSQL: ``--postgres-url`` (or ``IMGQ_BENCH_POSTGRES_URL``), else
postgresql://127.0.0.1:5432/test when it answers, else a throwaway server. The
benchmark works in a schema of its own and drops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import Stack, build_zeros, run_job, write_tiny  # noqa: E402

TARGETS = {
    "memory_ratio": 0.10,  # PostgreSQL store's Redis growth / the Redis store's, at most
    "memory_mb": 30.0,  # PostgreSQL store's Redis growth, at most
    "capacity_ratio": 0.8,  # PostgreSQL store's capacity / the Redis store's, at least
    "export_rss_mb": 250.0,  # producer peak RSS while exporting, at most
    "report_rss_mb": 250.0,  # producer peak RSS while writing the HTML report, at most
}
MODEL = "bench_zeros"
CHUNK = 512


class PeakSampler:
    """Samples Redis ``used_memory`` in a thread; the peak above the starting value."""

    def __init__(self, url: str) -> None:
        import redis

        # kombu's redis+socket:// is redis-py's unix://.
        self.client = redis.Redis.from_url(url.replace("redis+socket://", "unix://"))
        self.base = self.used()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 1e6


def postgres_base(explicit: str | None) -> tuple[str, Any]:
    """A PostgreSQL URL to work on, and the throwaway server behind it (or None)."""
    from tests.pg import LOCAL_URL, PostgresServer, answers

    url = explicit or os.environ.get("IMGQ_BENCH_POSTGRES_URL")
    if url:
        return url, None
    if answers(LOCAL_URL):
        return LOCAL_URL, None
    server = PostgresServer().init().start()
    return server.url(), server


def client_for(stack: Stack, results_url: str) -> Any:
    from producer.api import Client
    from shared.settings import Settings

    return Client(
        Settings(broker_url=stack.redis.url, models_file=stack.models_file, results_url=results_url)
    )


def start_worker(stack: Stack, results_url: str) -> None:
    stack.start_worker(
        MODEL,
        "--concurrency",
        "4",
        env={"IMGQ_DECODE_THREADS": "2", "IMGQ_RESULTS_URL": results_url},
    )


def memory_job(stack: Stack, results_url: str, sources: list[str]) -> dict[str, Any]:
    """One big job; Redis growth during it (submit and wait) and the time it took."""
    start_worker(stack, results_url)
    client = client_for(stack, results_url)
    run_job(client, sources[:CHUNK], MODEL, CHUNK)  # warm up
    with PeakSampler(stack.redis.url) as sampler:
        t0 = time.perf_counter()
        job = client.submit(sources, models=[MODEL], chunk_size=CHUNK)
        job.wait(progress=False, poll_interval=0.2)
        seconds = time.perf_counter() - t0
    after = sampler.used() - sampler.base
    return {
        "job_id": job.job_id,
        "images": len(sources),
        "seconds": seconds,
        "redis_peak_growth_mb": sampler.growth_mb,
        "redis_growth_after_bytes": after,
        "redis_bytes_per_record": after / len(sources),
    }


def pg_bytes_per_record(url: str, job_id: str) -> dict[str, float]:
    """Table and index size of the results table over its rows (one job in it)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE imgq_results")
        rows, table, total = conn.execute(
            "SELECT count(*), pg_table_size('imgq_results'), "
            "pg_total_relation_size('imgq_results') FROM imgq_results WHERE job_id = %s",
            (job_id,),
        ).fetchone()
    return {"rows": rows, "table_bytes": table / rows, "total_bytes": total / rows}


def fill_export_job(stack: Stack, url: str, n: int) -> str:
    """A job of ``n`` records straight into Redis (job record) and PostgreSQL (rows)."""
    import psycopg

    from shared.results_store import PostgresResultsStore
    from shared.schemas import ImageRef

    client = client_for(stack, url)
    job_id = "export-" + uuid.uuid4().hex[:8]
    refs = [ImageRef(src=f"/images/d{i // 1000:04d}/img{i:07d}.jpg", ref="") for i in range(n)]
    chunks = [refs[i : i + CHUNK] for i in range(0, n, CHUNK)]
    client.store.create(job_id, [MODEL], chunks, chunk_size=CHUNK)
    for index in range(len(chunks)):
        client.store.mark_finished(f"{job_id}.{MODEL}.{index:06d}", ok=len(chunks[index]), failed=0)
    PostgresResultsStore(url).check()
    labels = "ARRAY['tabby, tabby cat','tiger cat','Egyptian cat','lynx, catamount','Persian cat']"
    with psycopg.connect(url, autocommit=True) as conn:
        # Five top-5 entries per row with real label lengths, as a worker writes them.
        conn.execute(
            f"""INSERT INTO imgq_results (job_id, position, model, source, top1_index,
                top1_label, top1_score, top5)
            SELECT %s, i, %s, '/images/d' || lpad((i / 1000)::text, 4, '0') || '/img'
                   || lpad(i::text, 7, '0') || '.jpg', 282, 'tabby, tabby cat', 0.41,
                   (SELECT jsonb_agg(jsonb_build_object('index', 282 + k,
                        'label', ({labels})[k + 1], 'score', 0.41 / (k + 1)))
                    FROM generate_series(0, 4) AS k)
            FROM generate_series(0, %s - 1) AS i""",
            (job_id, MODEL, n),
        )
    return job_id


# Runs the CLI and prints the process's peak RSS (VmHWM, reset at exec, unlike the
# rusage of a child forked from this TensorFlow-sized process) as it exits.
_MEASURED_CLI = (
    "import atexit, runpy, sys\n"
    "def hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            print('VmHWM', int(line.split()[1]), file=sys.stderr)\n"
    "atexit.register(hwm)\n"
    "sys.argv = ['imgq', *sys.argv[1:]]\n"
    "runpy.run_module('producer.cli', run_name='__main__')\n"
)


def measured_cli(stack: Stack, url: str, argv: list[str], out: Path) -> dict[str, float]:
    """``imgq ARGV`` in a fresh process; its seconds, peak RSS (MiB) and file size."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")},
        "IMGQ_BROKER_URL": stack.redis.url,
        "IMGQ_RESULTS_URL": url,
    }
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED_CLI, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"imgq {argv[0]} failed: {done.stderr}")
    kib = int(done.stderr.rsplit("VmHWM", 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss_mb": kib / 1024, "bytes": out.stat().st_size}


def export(stack: Stack, url: str, job_id: str, fmt: str, out: Path) -> dict[str, float]:
    """``imgq results`` in a fresh process; its seconds and peak RSS (MiB)."""
    return measured_cli(stack, url, ["results", job_id, "--format", fmt, "--out", str(out)], out)


def html_report(stack: Stack, url: str, job_id: str, out: Path) -> dict[str, float]:
    """``imgq report --out`` in a fresh process; its seconds and peak RSS (MiB)."""
    return measured_cli(stack, url, ["report", job_id, "--out", str(out)], out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200_000, help="images in the memory job")
    parser.add_argument("--capacity-images", type=int, default=40_960)
    parser.add_argument("--runs", type=int, default=3, help="capacity runs per store")
    parser.add_argument("--export-records", type=int, default=1_000_000)
    parser.add_argument(
        "--report-records", type=int, default=200_000, help="records in the HTML report's job"
    )
    parser.add_argument("--postgres-url", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--only",
        choices=["memory", "export"],
        default=None,
        help="figures 1 and 4 alone, or figure 3 alone (while tuning)",
    )
    args = parser.parse_args()

    import psycopg

    from tests.pg import with_schema

    workdir = Path(tempfile.mkdtemp(prefix="imgq-pgb-"))
    print(f"working in {workdir}", file=sys.stderr)
    base, server = postgres_base(args.postgres_url)
    schema = f"imgq_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    pg_url = with_schema(base, schema)
    tiny: list[str] = []
    if args.only != "export":  # figure 3 needs no worker and no image
        build_zeros(workdir / "zeros")
        t = time.perf_counter()
        # Short paths: every image reference travels in a message and in the job record.
        tiny = [str(p) for p in write_tiny(workdir / "t", max(args.images, args.capacity_images))]
        print(f"{len(tiny)} images in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    models_file = workdir / "models.toml"
    models_file.write_text(
        f'[models.{MODEL}]\nhandle = "{workdir / "zeros"}"\ninput_size = 32\n'
        'labels = "imagenet1k"\nbatch_size = 512\nmax_batch_delay_ms = 0\n'
    )
    stack = Stack(workdir, models_file)
    r: dict[str, Any] = {
        "images": args.images,
        "export_records": args.export_records,
        "report_records": args.report_records,
    }
    try:
        if args.only == "export":
            export_figures(stack, pg_url, workdir, args, r)
            return 0 if report(r) else 1
        for name, url in (("redis", "redis"), ("postgresql", pg_url)):
            r[f"memory_{name}"] = memory_job(stack, url, tiny[: args.images])
            print(f"memory job, {name} store: {r[f'memory_{name}']}", file=sys.stderr)
        r["pg_bytes"] = pg_bytes_per_record(pg_url, r["memory_postgresql"]["job_id"])
        if args.only == "memory":
            return 0 if report(r) else 1
        rates: dict[str, list[float]] = {"redis": [], "postgresql": []}
        order = [("redis", "redis"), ("postgresql", pg_url)]
        for run in range(args.runs):
            for name, url in order if run % 2 == 0 else order[::-1]:
                start_worker(stack, url)
                client = client_for(stack, url)
                run_job(client, tiny[:CHUNK], MODEL, CHUNK)
                timing = run_job(client, tiny[: args.capacity_images], MODEL, CHUNK)
                rates[name].append(timing.rate)
        r["capacity"] = rates
        stack.stop_worker()
        export_figures(stack, pg_url, workdir, args, r)
    finally:
        stack.close()
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
        if server is not None:
            server.remove()
    ok = report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0 if ok else 1


def export_figures(
    stack: Stack, pg_url: str, workdir: Path, args: argparse.Namespace, r: dict[str, Any]
) -> None:
    """Figure 3: the export job through ``imgq results``, the report job through
    ``imgq report`` (each job's records written straight into PostgreSQL)."""
    job_id = fill_export_job(stack, pg_url, args.export_records)
    r["export_parquet"] = export(stack, pg_url, job_id, "parquet", workdir / "x.parquet")
    r["export_jsonl"] = export(stack, pg_url, job_id, "jsonl", workdir / "x.jsonl")
    if args.report_records != args.export_records:
        job_id = fill_export_job(stack, pg_url, args.report_records)
    r["report_html"] = html_report(stack, pg_url, job_id, workdir / "report.html")


def print_figure3(r: dict[str, Any]) -> None:
    """Figure 3's lines: each export, then the HTML report."""
    for fmt in ("parquet", "jsonl"):
        e = r[f"export_{fmt}"]
        print(
            f"3 export {r['export_records']} records to {fmt:<7}: {e['seconds']:.1f} s, "
            f"producer peak RSS {e['peak_rss_mb']:.0f} MiB "
            f"(target <= {TARGETS['export_rss_mb']:.0f}: "
            f"{'meets' if e['peak_rss_mb'] <= TARGETS['export_rss_mb'] else 'MISSES'}), "
            f"file {e['bytes'] / 1e6:.0f} MB"
        )
    h = r["report_html"]
    print(
        f"3 report {r['report_records']} records to html   : {h['seconds']:.1f} s, "
        f"producer peak RSS {h['peak_rss_mb']:.0f} MiB "
        f"(target <= {TARGETS['report_rss_mb']:.0f}: "
        f"{'meets' if h['peak_rss_mb'] <= TARGETS['report_rss_mb'] else 'MISSES'}), "
        f"file {h['bytes'] / 1e6:.0f} MB"
    )


def figure3_checks(r: dict[str, Any]) -> dict[str, bool]:
    """Figure 3's targets: exports and report under their peak RSS."""
    return {
        "export_rss_mb": max(r["export_parquet"]["peak_rss_mb"], r["export_jsonl"]["peak_rss_mb"])
        <= TARGETS["export_rss_mb"],
        "report_rss_mb": r["report_html"]["peak_rss_mb"] <= TARGETS["report_rss_mb"],
    }


def report(r: dict[str, Any]) -> bool:
    """Print the figures against their targets; True when every target is met."""
    if "memory_redis" not in r:  # --only export
        print(f"\nimgq results stores: {CHUNK}-image chunks, records written into PostgreSQL")
        print_figure3(r)
        return all(figure3_checks(r).values())
    mr, mp = r["memory_redis"], r["memory_postgresql"]
    ratio = mp["redis_peak_growth_mb"] / mr["redis_peak_growth_mb"]
    if "capacity" not in r:  # --only memory
        print(
            f"1 Redis peak growth, one {r['images']}-image job: redis store "
            f"{mr['redis_peak_growth_mb']:.1f} MB, postgresql store "
            f"{mp['redis_peak_growth_mb']:.1f} MB (ratio {ratio:.3f}); after the job "
            f"{mp['redis_bytes_per_record']:.0f} bytes per image (postgresql store), "
            f"{mr['redis_bytes_per_record']:.0f} per record (redis store)"
        )
        return ratio <= TARGETS["memory_ratio"] and mp["redis_peak_growth_mb"] <= 30
    cap_r = statistics.median(r["capacity"]["redis"])
    cap_p = statistics.median(r["capacity"]["postgresql"])
    checks = {
        "memory_ratio": ratio <= TARGETS["memory_ratio"],
        "memory_mb": mp["redis_peak_growth_mb"] <= TARGETS["memory_mb"],
        "capacity_ratio": cap_p / cap_r >= TARGETS["capacity_ratio"],
        **figure3_checks(r),
    }

    def mark(key: str) -> str:
        return "meets" if checks[key] else "MISSES"

    def runs(values: list[float]) -> str:
        return ", ".join(f"{v:.0f}" for v in values)

    n = r["images"]
    print(f"\nimgq results stores: a no-op model, 32x32 JPEGs, {CHUNK}-image chunks, one worker")
    print(
        f"1 Redis peak growth, one {n}-image job: redis store {mr['redis_peak_growth_mb']:.1f} MB, "
        f"postgresql store {mp['redis_peak_growth_mb']:.1f} MB"
    )
    print(
        f"  ratio {ratio:.3f} (target <= {TARGETS['memory_ratio']}: {mark('memory_ratio')}); "
        f"postgresql store {mp['redis_peak_growth_mb']:.1f} MB "
        f"(target <= {TARGETS['memory_mb']:.0f}: {mark('memory_mb')})"
    )
    print(f"  job time: redis store {mr['seconds']:.1f} s, postgresql store {mp['seconds']:.1f} s")
    print(
        f"2 capacity (median): redis store {cap_r:.0f} img/s "
        f"(runs {runs(r['capacity']['redis'])}), postgresql store {cap_p:.0f} img/s "
        f"(runs {runs(r['capacity']['postgresql'])})"
    )
    print(
        f"  ratio {cap_p / cap_r:.3f} (target >= {TARGETS['capacity_ratio']}: "
        f"{mark('capacity_ratio')})"
    )
    print_figure3(r)
    pg = r["pg_bytes"]
    print(
        f"4 bytes per record: postgresql {pg['total_bytes']:.0f} (table {pg['table_bytes']:.0f}, "
        f"indexes {pg['total_bytes'] - pg['table_bytes']:.0f}); redis store "
        f"{mr['redis_bytes_per_record']:.0f} (Redis growth after the job / records; the "
        f"postgresql store leaves {mp['redis_bytes_per_record']:.0f} per image in Redis)"
    )
    return all(checks.values())


if __name__ == "__main__":
    sys.exit(main())

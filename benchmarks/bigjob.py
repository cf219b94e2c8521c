"""Big jobs: what a streaming submit of a long manifest costs, and how soon work starts.

    python benchmarks/bigjob.py                       # 100k and 1M images, Redis store
    python benchmarks/bigjob.py --sizes 100000 --pg postgresql://127.0.0.1:5432/test
    python benchmarks/bigjob.py --json out.json --no-worker --chunk-size 128

For each size, a manifest of local paths (about 45 characters each, absolute, in
folders of 1,000, as a photo archive is laid out) is submitted with
``imgq submit @list.txt --model bench_zeros`` into a fresh Redis (no persistence),
as a separate process, over TCP on the loopback. Printed:

- ``submit_s``, ``rate``: the submit's wall time, and images per second;
  ``cpu_s``, ``rate_per_cpu_s``: the producer's CPU time (user and system), and
  images per CPU second (what a loaded machine changes least);
- ``peak_rss_mb``: the producer process's peak resident memory (``wait4``);
- ``redis_bytes_per_image``: Redis's ``used_memory`` after the submit minus before,
  per image, with its parts: the job's chunk list (``chunks_bytes_per_image``) and
  the queued messages (``queue_bytes_per_image``), each by ``MEMORY USAGE``;
  ``message_bytes``: one queued task's message as kombu stores it;
- ``list_compress_depth``: the Redis setting the run used (``--list-compress-depth``,
  by default 1, as imgq's embedded Redis and the compose files set it; ``0 1`` runs
  each size both ways, one after the other);
- ``status_s``, ``jobs_s``, ``cancel_s``, ``delete_s``: ``imgq status``, ``jobs``,
  ``cancel``, ``delete`` on the queued job, each its own process;
- ``first_result_s`` (unless ``--no-worker``): in a second run, with a worker of a
  model that does no work already consuming, the time from the submit's start to
  the first finished task (the images do not exist: a ``not_found`` record is the
  quickest result there is). The worker is paused at that moment, so that it does
  not take the producer's CPU for the rest of the run.

With ``--pg URL`` the producer and worker write results to PostgreSQL (the job
record stays in Redis either way).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import build_zeros, free_port  # noqa: E402
from producer.embedded import LIST_COMPRESS_DEPTH  # noqa: E402

MODEL = "bench_zeros"


def write_manifest(path: Path, n: int) -> None:
    """``n`` absolute paths of about 45 characters, 1,000 a folder."""
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for start in range(0, n, 100_000):
            fh.write(
                "".join(
                    f"/srv/archive/2024/roll-{i // 1000:05d}/IMG_{i:08d}.jpg\n"
                    for i in range(start, min(n, start + 100_000))
                )
            )
    tmp.rename(path)


def models_toml(workdir: Path) -> Path:
    path = workdir / "models.toml"
    path.write_text(
        f'[models.{MODEL}]\nhandle = "{workdir / "zeros"}"\ninput_size = 32\n'
        'labels = "imagenet1k"\nbatch_size = 32\n',
        encoding="utf-8",
    )
    return path


def imgq(env: dict[str, str], *args: str) -> tuple[float, int, str, float]:
    """Run ``imgq ARGS`` as its own process: (wall s, peak RSS in KiB, stdout, CPU s)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from producer.cli import main; main()", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"imgq {' '.join(args)} exited {proc.returncode}: {out[-500:]}")
    return wall, usage.ru_maxrss, out, usage.ru_utime + usage.ru_stime


def memory_of(client: Any, pattern: str) -> int:
    return sum(int(client.memory_usage(k, samples=0) or 0) for k in client.scan_iter(pattern))


def measure(
    workdir: Path,
    models_file: Path,
    n: int,
    pg: str | None,
    with_worker: bool,
    chunk_size: int,
    depth: int = LIST_COMPRESS_DEPTH,
) -> dict[str, Any]:
    from producer.embedded import EmbeddedRedis, EmbeddedWorker

    manifest = workdir / f"list-{n}.txt"
    write_manifest(manifest, n)
    out: dict[str, Any] = {
        "images": n,
        "chunk_size": chunk_size,
        "store": "postgresql" if pg else "redis",
        "list_compress_depth": depth,
    }
    server = EmbeddedRedis(None, port=free_port(), appendonly=False).start()
    try:
        server.client().config_set("list-compress-depth", depth)
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
        env.update(
            IMGQ_BROKER_URL=server.url,
            IMGQ_MODELS_FILE=str(models_file),
            IMGQ_CHUNK_SIZE=str(chunk_size),
            PYTHONPATH=str(ROOT),
        )
        if pg:
            env["IMGQ_RESULTS_URL"] = pg
        client = server.client()
        before = int(client.info("memory")["used_memory"])
        wall, rss_kib, stdout, cpu = imgq(env, "submit", f"@{manifest}", "--model", MODEL)
        job_id = stdout.strip().splitlines()[-1]
        after = int(client.info("memory")["used_memory"])
        out |= {
            "submit_s": round(wall, 2),
            "rate": round(n / wall),
            "cpu_s": round(cpu, 2),
            "rate_per_cpu_s": round(n / cpu),
            "peak_rss_mb": round(rss_kib / 1024),
            "redis_bytes_per_image": round((after - before) / n, 1),
            "chunks_bytes_per_image": round(memory_of(client, f"imgq:job:{job_id}:chunks") / n, 1),
            "queue_bytes_per_image": round(memory_of(client, f"imgq.{MODEL}*") / n, 1),
            "message_bytes": len(
                next(client.lindex(k, 0) for k in client.scan_iter(f"imgq.{MODEL}*"))
            ),
        }
        for name, args in (
            ("status_s", ("status", job_id)),
            ("jobs_s", ("jobs",)),
            ("cancel_s", ("cancel", job_id)),
            ("delete_s", ("delete", job_id, "--yes")),
        ):
            out[name] = round(imgq(env, *args)[0], 2)
        if with_worker:
            log = workdir / f"worker-{n}-{time.monotonic_ns()}.log"
            worker = EmbeddedWorker([MODEL], server.url, log, env=dict(env)).start()
            worker.wait_ready(timeout=300)
            try:
                out["first_result_s"] = round(first_result(client, env, manifest, worker), 2)
            finally:
                worker.stop(grace=10)
    finally:
        server.stop()
    return out


def first_result(client: Any, env: dict[str, str], manifest: Path, worker: Any) -> float:
    """Seconds from the submit's start to the first finished task of its job."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("imgq:job:*:progress")
    got: list[float] = []

    def listen() -> None:
        while not got:
            if pubsub.get_message(timeout=0.05) is not None:
                got.append(time.monotonic())
                worker.proc.send_signal(signal.SIGSTOP)  # off the producer's CPU

    thread = threading.Thread(target=listen, daemon=True)
    t0 = time.monotonic()
    thread.start()
    try:
        imgq(env, "submit", f"@{manifest}", "--model", MODEL)
        thread.join(60)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
        pubsub.close()
    if not got:
        raise RuntimeError("no task finished")
    return got[0] - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--pg", default=None, help="a PostgreSQL URL for the results")
    parser.add_argument("--no-worker", action="store_true", help="skip first_result_s")
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the manifests")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--list-compress-depth",
        type=int,
        nargs="+",
        default=[LIST_COMPRESS_DEPTH],
        help="Redis's list-compress-depth for the run (0 1: both, side by side)",
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imgq-bigjob-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "zeros").exists():
        build_zeros(workdir / "zeros")
    models_file = models_toml(workdir)
    results = []
    for n in args.sizes:
        for depth in args.list_compress_depth:
            row = measure(
                workdir, models_file, n, args.pg, not args.no_worker, args.chunk_size, depth
            )
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

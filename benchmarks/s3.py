"""Images in buckets: what reading from an S3-protocol server costs a worker, how fast a
prefix is listed and a job exported, and the producer's memory while listing.

    python benchmarks/s3.py                        # the figures in docs/benchmarks.md
    python benchmarks/s3.py --images 120 --rounds 3 --list-objects 5000 --rss 2000 20000

The server is moto's standalone server (``moto[server]``) on loopback, in a process
of its own on the same machine: every figure includes the server's own CPU time,
which on a small machine is most of it. Figures:

1. objects/s fetched by one worker's decode threads (``--threads``, a worker's
   ``IMGQ_DECODE_THREADS``), for each client library installed: boto3 (imgq's),
   obstore and s3fs, and for comparison a bare GET signed by botocore and sent by
   urllib3, in alternating rounds; and each one's CPU per object (sequential GETs);
2. images/s read and decoded through the worker's own reader
   (``workers.inputs.load_image``) from the bucket, against the same JPEGs as local
   files, in alternating rounds, and the ratio;
3. listing rate: objects/s through ``producer.s3_sources.expand_s3``;
4. the producer's peak RSS while a listing of N objects streams through it
   (references consumed in chunks, as a streaming submit holds them), for two N;
5. export rate: records/s written to the bucket as JSONL through ``S3Writer``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import write_photos
from tests.s3server import DUMMY_CREDENTIALS, start_moto

BUCKET = "bench"


def put_many(client: Any, keys: list[str], body: Callable[[int], bytes], threads: int = 8) -> None:
    """PUT every key (in parallel)."""
    with ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=BUCKET, Key=keys[i], Body=body(i)),
                range(len(keys)),
            )
        )


def fetchers(endpoint: str) -> dict[str, Callable[[str], bytes]]:
    """One GET of a key as bytes, per client library that is installed."""
    import boto3
    import botocore.config

    out: dict[str, Callable[[str], bytes]] = {}
    c = boto3.client(
        "s3", endpoint_url=endpoint, config=botocore.config.Config(max_pool_connections=16)
    )
    out["boto3"] = lambda k: c.get_object(Bucket=BUCKET, Key=k)["Body"].read()
    try:
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            BUCKET,
            endpoint=endpoint,
            region="us-east-1",
            access_key_id="testing",
            secret_access_key="testing",
            client_options={"allow_http": True},
        )
        out["obstore"] = lambda k: bytes(obstore.get(store, k).bytes())
    except ImportError:
        print("obstore not installed: left out")
    try:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        out["s3fs"] = lambda k: fs.cat(f"{BUCKET}/{k}")
    except ImportError:
        print("s3fs not installed: left out")
    out["signed-urllib3"] = signed_get(endpoint)
    return out


def signed_get(endpoint: str) -> Callable[[str], bytes]:
    """For comparison, the least a Python GET can do: botocore's SigV4 signature and
    urllib3's connection pool, no redirect followed, nothing else (no retries, no
    response parsing, no event hooks)."""
    import botocore.auth
    import botocore.awsrequest
    import botocore.session
    import urllib3

    credentials = botocore.session.get_session().get_credentials()
    pool = urllib3.PoolManager(maxsize=16, retries=False)

    def get(key: str) -> bytes:
        url = f"{endpoint}/{BUCKET}/{key}"
        request = botocore.awsrequest.AWSRequest(method="GET", url=url)
        signer = botocore.auth.S3SigV4Auth(credentials.get_frozen_credentials(), "s3", "us-east-1")
        signer.add_auth(request)
        response = pool.request("GET", url, headers=dict(request.headers.items()), redirect=False)
        if response.status != 200:
            raise RuntimeError(f"GET {key}: HTTP {response.status}")
        return bytes(response.data)

    return get


def client_cpu_ms(fn: Callable[[str], Any], keys: list[str]) -> float:
    """The client's CPU per object over sequential GETs, in milliseconds."""
    fn(keys[0])
    start = time.process_time()
    for key in keys:
        fn(key)
    return (time.process_time() - start) / len(keys) * 1000


def rate(fn: Callable[[str], Any], items: list[str], threads: int) -> float:
    """Items per second through fn on a pool of threads."""
    fn(items[0])
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, items))
    return len(items) / (time.perf_counter() - start)


def rss_child(n: int, chunk: int) -> None:
    """In a process of its own: list the bucket's rss/N prefix, holding one chunk.

    RSS is read from /proc/self/statm every 1,024 objects: ``ru_maxrss`` would not do,
    as Linux carries it over from the parent this process was forked from."""
    from producer.s3_sources import expand_s3

    def rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    count, held, first, peak = 0, [], 0.0, rss_mb()
    for ref in expand_s3(f"s3://{BUCKET}/rss{n}/"):
        held.append(ref)
        if len(held) == chunk:
            count += len(held)
            held = []
            if count % 1024 == 0:
                peak = max(peak, rss_mb())
                first = first or peak
    count += len(held)
    end = rss_mb()
    print(
        json.dumps(
            {"n": count, "peak_rss_mb": max(peak, end), "rss_first_mb": first, "rss_end_mb": end}
        )
    )


def memory_figures(s3: Any, counts: list[int]) -> None:
    """Figure 4: list N objects in a child process, for each N."""
    for count in counts:
        put_many(s3, [f"rss{count}/{i:07d}.jpg" for i in range(count)], lambda i: b"x")
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(count)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"4 listing {got['n']} objects: producer peak RSS {got['peak_rss_mb']:.0f} MiB "
            f"(RSS after 1,024 objects {got['rss_first_mb']:.0f} MiB, at the end "
            f"{got['rss_end_mb']:.0f} MiB)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--list-objects", type=int, default=20000)
    parser.add_argument("--rss", type=int, nargs=2, default=[10000, 100000])
    parser.add_argument("--export-records", type=int, default=200000)
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--only-rss", action="store_true", help="figure 4 alone")
    args = parser.parse_args(argv)
    os.environ.update(DUMMY_CREDENTIALS)
    if args.rss_child:
        rss_child(args.rss_child, 32)
        return 0

    import boto3

    server = start_moto()
    try:
        endpoint = server.endpoint
        os.environ.update(IMGQ_S3_ENDPOINT_URL=endpoint, IMGQ_ALLOW_PRIVATE_URLS="true")
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=BUCKET)
        if args.only_rss:
            memory_figures(s3, args.rss)
            return 0
        work = Path(tempfile.mkdtemp(prefix="imgq-s3-bench-"))
        paths = write_photos(work / "photos", args.images)
        keys = [f"photos/{p.name}" for p in paths]
        put_many(s3, keys, lambda i: paths[i].read_bytes())
        size = statistics.mean(p.stat().st_size for p in paths)
        print(
            f"{len(paths)} JPEGs 640x480, {size / 1024:.0f} KiB on average; {args.threads} threads"
        )

        # 1. the libraries
        libs = fetchers(endpoint)
        per_lib: dict[str, list[float]] = {name: [] for name in libs}
        for r in range(args.rounds):
            order = list(libs.items()) if r % 2 == 0 else list(reversed(libs.items()))
            for name, fn in order:
                per_lib[name].append(rate(fn, keys, args.threads))
        cpu_ms: dict[str, list[float]] = {name: [] for name in libs}
        for r in range(3):
            for name, fn in list(libs.items()) if r % 2 == 0 else reversed(libs.items()):
                cpu_ms[name].append(client_cpu_ms(fn, keys[:100]))
        for name, rates in per_lib.items():
            print(
                f"1 fetch, {name:<14} {statistics.median(rates):7.0f} objects/s "
                f"(rounds {', '.join(f'{x:.0f}' for x in rates)}); client CPU "
                f"{statistics.median(cpu_ms[name]):.2f} ms per object (sequential GETs)"
            )

        # 2. fetch and decode against local files
        from shared.settings import get_settings
        from workers.inputs import ReadLimits, load_image

        limits = ReadLimits.from_settings(get_settings())
        local = [str(p) for p in paths]
        remote = [f"s3://{BUCKET}/{k}" for k in keys]
        decode = lambda ref: load_image(ref, (224, 224), limits)  # noqa: E731
        import psutil

        moto_proc = psutil.Process(server.process.pid)
        ratios, s3_rates, file_rates = [], [], []
        cpu: dict[str, list[float]] = {"files": [], "s3": [], "server": []}
        for r in range(args.rounds):
            pair = [(local, file_rates, "files"), (remote, s3_rates, "s3")]
            for refs, into, name in pair if r % 2 == 0 else reversed(pair):
                own, theirs = time.process_time(), sum(moto_proc.cpu_times()[:2])
                into.append(rate(decode, refs, args.threads))
                cpu[name].append((time.process_time() - own) / len(refs) * 1000)
                if name == "s3":
                    used = sum(moto_proc.cpu_times()[:2]) - theirs
                    cpu["server"].append(used / len(refs) * 1000)
            ratios.append(s3_rates[-1] / file_rates[-1])
        med = {k: statistics.median(v) for k, v in cpu.items()}
        print(
            f"  CPU ms per image: the reader's process {med['files']:.2f} (files), "
            f"{med['s3']:.2f} (s3://, ratio {med['files'] / med['s3']:.3f}); "
            f"the S3 server {med['server']:.2f}"
        )
        print(f"2 decoded, local files {statistics.median(file_rates):7.0f} images/s")
        print(f"  decoded, s3://       {statistics.median(s3_rates):7.0f} images/s")
        print(
            f"  ratio (median of rounds) {statistics.median(ratios):.3f} "
            f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})"
        )

        # 3. listing rate
        from producer.s3_sources import expand_s3

        listed = [f"list/{i:07d}.jpg" for i in range(args.list_objects)]
        put_many(s3, listed, lambda i: b"x")
        start = time.perf_counter()
        n = sum(1 for _ in expand_s3(f"s3://{BUCKET}/list/"))
        elapsed = time.perf_counter() - start
        print(f"3 listing {n} objects: {elapsed:.2f} s, {n / elapsed:.0f} objects/s")

        memory_figures(s3, args.rss)

        # 5. export rate
        from producer.output import write_records
        from producer.s3_output import S3Writer
        from shared.schemas import Prediction, ResultRecord

        top5 = [Prediction(index=i, label=f"label {i}", score=0.1) for i in range(5)]
        records = (
            ResultRecord(
                job_id="bench",
                image=f"s3://{BUCKET}/photos/{i:07d}.jpg",
                model="resnet50",
                top5=top5,
            )
            for i in range(args.export_records)
        )
        import io

        start = time.perf_counter()
        with S3Writer(f"s3://{BUCKET}/export.jsonl") as sink:
            text = io.TextIOWrapper(io.BufferedWriter(sink, 1024 * 1024), encoding="utf-8")
            written = write_records(records, text, "jsonl")
            text.flush()
            text.detach().detach()
        elapsed = time.perf_counter() - start
        print(
            f"5 export {written} records as JSONL ({sink.written / 2**20:.0f} MiB): "
            f"{elapsed:.2f} s, "
            f"{written / elapsed:.0f} records/s"
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

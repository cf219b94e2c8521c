"""imgq on the CPU's fast paths: precision, runtime and decoding, end to end.

    python benchmarks/precision.py            # about 4 minutes on 2 CPU cores
    python benchmarks/precision.py --quick    # one short round (a smoke test)

One worker serves the same ResNet-50 SavedModel (random weights, as in
benchmarks/run.py) under several model names, one per mode: TensorFlow fp32 (the
default), TensorFlow bf16, OpenVINO fp32, OpenVINO bf16, and OpenVINO bf16 with
exact JPEG decoding (a full decode, then the resize). Each round runs the direct
float32 SavedModel call on decoded batches (in a bare process) and one job per
mode on the same real JPEGs, in alternating order;
the medians of the rounds are reported. Every mode's top-1 class and score per image
is compared with imgq fp32 (the fast decode) on the same images, and exact decoding
with the fast one in the same mode. Last, the time a worker takes to load the model
with OpenVINO from a warm conversion cache, against a TensorFlow load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import Stack, build_resnet50, run_direct, write_photos

BATCH = 32
# name -> models-file keys (precision, runtime, decode); fp32 TensorFlow is the reference.
MODES: dict[str, dict[str, str]] = {
    "tf_fp32": {},
    "tf_bf16": {"precision": "bf16"},
    "ov_fp32": {"runtime": "openvino"},
    "ov_bf16": {"runtime": "openvino", "precision": "bf16"},
    "ov_bf16_exact": {"runtime": "openvino", "precision": "bf16", "decode": "exact"},
}
TARGETS = {"speedup": 2.0, "top1_agreement": 0.99, "warm_start_ratio": 1.2}


def models_toml(model_dir: Path) -> str:
    """One [models.bench_<mode>] table per mode, all on the same SavedModel."""
    tables = []
    for mode, keys in MODES.items():
        lines = [
            f"[models.bench_{mode}]",
            f'handle = "{model_dir}"',
            "input_size = 224",
            'labels = "imagenet1k"',
            f"batch_size = {BATCH}",
            *(f'{k} = "{v}"' for k, v in keys.items()),
        ]
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def run_mode(client: Any, photos: Sequence[str], mode: str) -> tuple[float, dict[str, Any]]:
    """Images/s end to end (submit, wait, fetch) and each image's top-5."""
    t0 = time.perf_counter()
    job = client.submit(list(photos), models=[f"bench_{mode}"], chunk_size=BATCH)
    job.wait(progress=False, poll_interval=0.05)
    records = job.results()
    elapsed = time.perf_counter() - t0
    bad = [r for r in records if r.error]
    if len(records) != len(photos) or bad:
        raise RuntimeError(f"mode {mode}: {len(records)} records, errors {bad[:2]}")
    top = {r.image: [(t.index, t.score) for t in r.top5] for r in records}
    return len(photos) / elapsed, top


def fidelity(reference: dict[str, Any], other: dict[str, Any]) -> tuple[float, float, float]:
    """Top-1 agreement, same top-5 set, and the largest top-1 score difference."""
    images = sorted(reference)
    same1 = sum(reference[i][0][0] == other[i][0][0] for i in images) / len(images)
    same5 = sum({k for k, _ in reference[i]} == {k for k, _ in other[i]} for i in images) / len(
        images
    )
    largest = max(abs(reference[i][0][1] - other[i][0][1]) for i in images)
    return same1, same5, largest


def start_worker(stack: Stack, models: Sequence[str], env: dict[str, str]) -> float:
    """Start one worker serving ``models``; seconds until it is ready to consume."""
    from producer.embedded import EmbeddedWorker

    stack.stop_worker()
    log = stack.workdir / f"worker-{time.monotonic_ns()}.log"
    t0 = time.perf_counter()
    stack.worker = EmbeddedWorker(
        list(models),
        stack.redis.url,
        log,
        env={"IMGQ_MODELS_FILE": str(stack.models_file), **env},
    ).start()
    stack.worker.wait_ready(timeout=300)
    return time.perf_counter() - t0


def load_times(log: Path) -> dict[str, float]:
    """Seconds each model took to load, from the worker's log ("loading model" to "ready")."""
    from datetime import datetime

    started: dict[str, datetime] = {}
    took: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("[") or "] " not in line:
            continue
        stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
        words = line.split("] ", 1)[1].split()
        if words[:2] == ["loading", "model"]:
            started[words[2]] = stamp
        elif len(words) > 2 and words[0] == "model" and words[2] == "ready:":
            took[words[1]] = (stamp - started[words[1]]).total_seconds()
    return took


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    per_round = 2 * BATCH
    workdir = Path(tempfile.mkdtemp(prefix="imgq-bench-precision-"))
    print(f"working in {workdir}", file=sys.stderr)
    build_resnet50(workdir / "resnet50")
    photos = [str(p) for p in write_photos(workdir / "photos", rounds * per_round)]
    models_file = workdir / "models.toml"
    models_file.write_text(models_toml(workdir / "resnet50"))
    env = {"IMGQ_OPENVINO_CACHE_DIR": str(workdir / "ov-cache")}

    stack = Stack(workdir, models_file)
    rates: dict[str, list[float]] = {"direct": [], **{m: [] for m in MODES}}
    tops: dict[str, dict[str, Any]] = {m: {} for m in MODES}
    results: dict[str, Any] = {"rounds": rounds, "images_per_round": per_round}
    try:
        models = [f"bench_{m}" for m in MODES]
        results["cold_start_all_modes_s"] = start_worker(stack, models, env)
        client = stack.client()
        for r in range(rounds):
            subset = photos[r * per_round : (r + 1) * per_round]
            order = ["direct", *MODES]
            if r % 2:
                order.reverse()  # alternate, so the machine's drift hits all alike
            for mode in order:
                if mode == "direct":
                    d = run_direct(workdir / "resnet50", BATCH, per_round // BATCH, workdir)
                    rates["direct"].append(d["images_per_s"])
                else:
                    rate, top = run_mode(client, subset, mode)
                    rates[mode].append(rate)
                    tops[mode].update(top)
        loads = load_times(stack.worker.log_path)
        stack.stop_worker()
        # A restart of an OpenVINO worker: the conversion cache is warm now.
        start_worker(stack, ["bench_ov_bf16"], env)
        warm = load_times(stack.worker.log_path)["bench_ov_bf16"]
        results["load_s"] = {
            "tf_fp32": loads["bench_tf_fp32"],
            "ov_bf16_cold": loads["bench_ov_bf16"],
            "ov_fp32_cold": loads["bench_ov_fp32"],
            "ov_bf16_warm": warm,
        }
    finally:
        stack.close()

    results["rates"] = rates
    ref = tops["tf_fp32"]
    direct = statistics.median(rates["direct"])
    print(
        f"\nimgq precision benchmark: ResNet-50 (random weights), batch {BATCH}, "
        f"{rounds} alternating rounds of {per_round} photos 640x480 per mode"
    )
    print(f"  direct SavedModel call, fp32, decoded batches  {direct:7.1f} img/s (median)")
    figures: dict[str, Any] = {}
    for mode in MODES:
        median = statistics.median(rates[mode])
        speedup = median / direct
        same1, same5, largest = fidelity(ref, tops[mode])
        figures[mode] = {
            "rate": median,
            "speedup": speedup,
            "top1": same1,
            "top5_set": same5,
            "max_score_diff": largest,
        }
        print(
            f"  imgq {mode:<14} {median:7.1f} img/s  x{speedup:4.2f} of direct  "
            f"top-1 agreement {same1:6.1%}, same top-5 {same5:6.1%}, "
            f"largest top-1 score difference {largest:.2e}"
            f"  (rounds {', '.join(f'{v:.1f}' for v in rates[mode])})"
        )
    distinct = len({v[0][0] for v in ref.values()})
    print(f"  ({distinct} distinct top-1 classes among {len(ref)} photos in fp32)")
    fastest = max(MODES, key=lambda m: figures[m]["rate"])
    best = figures[fastest]
    ok = best["speedup"] >= TARGETS["speedup"] and best["top1"] >= TARGETS["top1_agreement"]
    print(
        f"fastest mode {fastest}: x{best['speedup']:.2f} of the direct fp32 call, top-1 "
        f"agreement {best['top1']:.1%} (targets >= {TARGETS['speedup']}x and "
        f">= {TARGETS['top1_agreement']:.0%}: {'meets' if ok else 'MISSES'})"
    )
    exact_1, _, exact_diff = fidelity(tops["ov_bf16"], tops["ov_bf16_exact"])
    print(
        f"  exact against fast decoding (both OpenVINO bf16): top-1 agreement {exact_1:.1%}, "
        f"largest top-1 score difference {exact_diff:.2e}"
    )
    if "load_s" in results:
        load = results["load_s"]
        ratio = load["ov_bf16_warm"] / load["tf_fp32"]
        warm_ok = ratio <= TARGETS["warm_start_ratio"]
        ok = ok and warm_ok
        print(
            f"model load: TensorFlow {load['tf_fp32']:.1f} s; OpenVINO converting "
            f"{load['ov_fp32_cold']:.1f} s, compiling bf16 from a fresh conversion "
            f"{load['ov_bf16_cold']:.1f} s, after a restart (warm cache) "
            f"{load['ov_bf16_warm']:.1f} s: "
            f"ratio {ratio:.2f} of TensorFlow (target <= {TARGETS['warm_start_ratio']}: "
            f"{'meets' if warm_ok else 'MISSES'}); whole 5-model worker start "
            f"{results['cold_start_all_modes_s']:.0f} s"
        )
    results["figures"] = figures
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

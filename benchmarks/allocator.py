"""TensorFlow's CPU allocator, malloc against BFC, on the model a worker runs.

    python benchmarks/allocator.py               # 4 rounds (about 4 minutes on 2 cores)
    python benchmarks/allocator.py --rounds 8    # a tighter median
    python benchmarks/allocator.py --keep DIR    # keep (and reuse) the SavedModel

TensorFlow reads its allocator from the environment once per process
(``TF_CPU_ALLOCATOR_USE_BFC``), so each side runs in processes of its own: every
round starts one process per allocator, in alternating order, and each loads the
ResNet-50 architecture (random weights) as a SavedModel, makes one call to warm up,
then times ``--calls`` calls on 32-image float32 batches, each converted from a NumPy
array at the call. Printed per process: the median seconds per call, the CPU seconds per
call spent in user and in kernel mode, the minor page faults per call, resident
memory at the end and at its peak; then the medians per allocator and their ratio.
Where TensorFlow turns oneDNN's operations on (CPUs with AVX-512 VNNI, BF16 or AMX),
its CPU allocator is oneDNN's pool whatever ``TF_CPU_ALLOCATOR_USE_BFC`` says, and the
two sides are the same allocator: the script says so, and ``--onednn off`` runs both
with ``TF_ENABLE_ONEDNN_OPTS=0`` to compare malloc with BFC there.
Workers use BFC unless ``TF_CPU_ALLOCATOR_USE_BFC`` says otherwise
(``workers/tf_allocator.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from workers.tf_allocator import USE_BFC  # noqa: E402

BATCH = 32
MODES = {"malloc": "false", "bfc": "true"}


def child(model_dir: Path, calls: int, batch: int) -> dict[str, Any]:
    """One process's figures (run with the allocator already chosen by its environment)."""
    import numpy as np
    import tensorflow as tf

    from benchmarks.run import memory_mb

    model = tf.saved_model.load(str(model_dir))
    images = np.random.default_rng(0).random((batch, 224, 224, 3), dtype=np.float32)
    model(tf.constant(images)).numpy()  # the first call traces and sizes everything
    seconds, user, system, faults = [], [], [], []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        model(tf.constant(images)).numpy()
        seconds.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        user.append(after.ru_utime - before.ru_utime)
        system.append(after.ru_stime - before.ru_stime)
        faults.append(after.ru_minflt - before.ru_minflt)
    return {
        "onednn": onednn_on(),
        "s_per_call": statistics.median(seconds),
        "user_s_per_call": statistics.mean(user),
        "sys_s_per_call": statistics.mean(system),
        "faults_per_call": statistics.mean(faults),
        "rss_mib": memory_mb(os.getpid(), "VmRSS"),
        "peak_rss_mib": memory_mb(os.getpid()),
    }


def onednn_on() -> bool:
    """Whether this process's TensorFlow runs oneDNN's operations (and its allocator)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def run_child(
    mode: str, model_dir: Path, calls: int, batch: int, onednn: str = "default"
) -> dict[str, Any]:
    """One process with allocator ``mode``; its figures."""
    env = {**os.environ, USE_BFC: MODES[mode]}
    if onednn == "off":
        env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    args = [sys.executable, __file__, "--child", str(model_dir), f"--calls={calls}"]
    out = subprocess.run(
        [*args, f"--batch={batch}"], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"the {mode} process failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="processes per allocator")
    parser.add_argument("--calls", type=int, default=8, help="timed calls per process")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--keep", type=Path, help="a folder for the SavedModel (reused)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--onednn",
        choices=("default", "off"),
        default="default",
        help="off: both sides with TF_ENABLE_ONEDNN_OPTS=0 (where oneDNN is on, its "
        "allocator replaces both)",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.calls, args.batch)))
        return 0
    if args.rounds < 1 or args.calls < 1 or args.batch < 1:
        parser.error("--rounds, --calls and --batch must be at least 1")

    from benchmarks.run import build_resnet50

    with tempfile.TemporaryDirectory(prefix="imgq-alloc-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model_dir = folder / "r50"
        if not (model_dir / "saved_model.pb").exists():
            build_resnet50(model_dir)
        print(
            f"ResNet-50 (random weights), fp32, batch {args.batch}, {args.calls} timed calls "
            f"per process, {args.rounds} processes per allocator, alternating, oneDNN "
            f"{args.onednn}"
        )
        figures: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                f = run_child(mode, model_dir, args.calls, args.batch, args.onednn)
                figures[mode].append(f)
                if f["onednn"] and r == 0 and mode == order[0]:
                    print(
                        "oneDNN is on: TensorFlow's CPU allocator is oneDNN's pool on "
                        "both sides (--onednn off compares malloc with BFC)"
                    )
                print(
                    f"round {r + 1}: {mode:6s} {f['s_per_call']:6.3f} s/call "
                    f"({args.batch / f['s_per_call']:5.1f} img/s)  CPU user "
                    f"{f['user_s_per_call']:5.2f} s, kernel {f['sys_s_per_call']:4.2f} s, "
                    f"{f['faults_per_call']:8.0f} page faults per call; RSS "
                    f"{f['rss_mib']:5.0f} MiB (peak {f['peak_rss_mib']:5.0f})",
                    flush=True,
                )

    def med(mode: str, key: str) -> float:
        return statistics.median(f[key] for f in figures[mode])

    for mode in MODES:
        print(
            f"{mode:6s} median {med(mode, 's_per_call'):.3f} s/call, kernel "
            f"{med(mode, 'sys_s_per_call'):.2f} s/call, {med(mode, 'faults_per_call'):.0f} "
            f"faults/call, peak RSS {med(mode, 'peak_rss_mib'):.0f} MiB"
        )
    pairs = [
        m["s_per_call"] / b["s_per_call"]
        for m, b in zip(figures["malloc"], figures["bfc"], strict=True)
    ]
    print(
        f"bfc speed-up over malloc: x{med('malloc', 's_per_call') / med('bfc', 's_per_call'):.3f}"
        f" (medians); per round x{min(pairs):.3f} to x{max(pairs):.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What decoding the next batch costs the model on the same cores, in one process.

    python benchmarks/decode_contention.py              # 4 rounds (about 3 minutes on 2 cores)
    python benchmarks/decode_contention.py --rounds 8

A worker decodes the next chunk while the model runs on the current one; on a CPU host
both share the cores. Here one process runs ResNet-50 (random weights, fp32,
TensorFlow, batch 32) through the worker's own classifier on 8 batches of photos
already decoded, with no decoding beside it, then again while 4 threads decode the
next 32 photos (500x375 JPEGs, the worker's own decoder) beside each batch: at the
worker's niceness, and under ``SCHED_IDLE`` (Linux). The modes alternate round by
round in the same process, so the process's own speed (which moves by several
percent from one TensorFlow process to the next) weighs on all of them alike.
Printed: the wall time of each mode and its ratio to the model alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.run import build_resnet50, write_photos  # noqa: E402

BATCH = 32
BATCHES = 8
SIZE = (224, 224)
PHOTO = (500, 375)
MAX_PIXELS = 10**9


def priority_setter(mode: str) -> Callable[[], None] | None:
    """A thread-pool initializer giving each decode thread the mode's CPU priority
    (``niced``: the worker's own, set by the worker's own helper)."""
    from workers.runtime import _lower_priority

    if mode == "niced":
        return _lower_priority
    if mode == "sched_idle":
        return lambda: os.sched_setscheduler(
            threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0)
        )
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--keep", type=Path, help="a folder for the model and photos (reused)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not sys.platform.startswith("linux"):
        parser.error("per-thread priorities are a Linux feature")

    from shared.registry import Activation, ModelSpec
    from workers.classifier import Classifier
    from workers.inputs import decode_image
    from workers.runtime import DECODE_NICENESS

    work = args.keep or Path(tempfile.mkdtemp(prefix="imgq-contention-"))
    model_dir = work / "r50"
    if not (model_dir / "saved_model.pb").exists():
        build_resnet50(model_dir)
    photos = sorted((work / "photos").glob("*.jpg"))
    if len(photos) != BATCH * BATCHES:
        photos = write_photos(work / "photos", BATCH * BATCHES, PHOTO)
    data = [p.read_bytes() for p in photos]

    def decode(blob: bytes) -> npt.NDArray[np.uint8]:
        return decode_image(blob, SIZE, max_pixels=MAX_PIXELS)

    batches = [[decode(b) for b in data[i : i + BATCH]] for i in range(0, len(data), BATCH)]
    spec = ModelSpec("bench", str(model_dir), SIZE, Activation.SOFTMAX, "imagenet1k")
    clf = Classifier(spec, max_batch_size=BATCH).load()
    for _ in range(2):
        clf.predict(batches[0])

    modes = ["model alone", "niced", "sched_idle"]
    pools = {m: ThreadPoolExecutor(4, initializer=priority_setter(m)) for m in modes[1:]}

    def run(mode: str) -> float:
        pool = pools.get(mode)
        start = time.perf_counter()
        for k, batch in enumerate(batches):
            decoding = None
            if pool is not None:  # the next chunk's photos, as the worker prefetches them
                decoding = pool.map(decode, data[k * BATCH : (k + 1) * BATCH])
            clf.predict(batch)
            if decoding is not None:
                list(decoding)
        return time.perf_counter() - start

    walls: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            walls[mode].append(run(mode))
        print(
            f"round {r + 1}: " + ", ".join(f"{m} {walls[m][-1]:.2f} s" for m in modes),
            flush=True,
        )
    for pool in pools.values():
        pool.shutdown()

    decode_cpu = time.process_time()
    for blob in data:
        decode(blob)
    decode_cpu = time.process_time() - decode_cpu

    alone = statistics.median(walls["model alone"])
    images = BATCH * BATCHES
    print(f"{images} photos {PHOTO[0]}x{PHOTO[1]}, batch {BATCH}, {args.rounds} rounds, medians:")
    print(f"  model alone                       {alone:6.2f} s")
    labels = {
        "niced": f"decoding beside it, nice {DECODE_NICENESS}",
        "sched_idle": "decoding beside it, SCHED_IDLE",
    }
    for mode in modes[1:]:
        wall = statistics.median(walls[mode])
        print(f"  {labels[mode]:33s} {wall:6.2f} s  x{wall / alone:.3f} of the model alone")
    cores = os.cpu_count() or 1
    print(
        f"decoding the {images} photos alone: {decode_cpu:.2f} s of CPU "
        f"({decode_cpu / images * 1000:.2f} ms each), {decode_cpu / cores / alone:.1%} of the "
        f"model's wall time spread over {cores} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""uint8 against float32 between the decoders and the model, and the decode rate per core.

    python benchmarks/uint8_transport.py            # about 5 minutes on 2 CPU cores
    python benchmarks/uint8_transport.py --quick    # one short round (a smoke test)

The model path is what runs between decoded images and top-5: the batch stacked
and padded, handed to TensorFlow, the model called, the top-k read back. Measured
on ResNet-50 (random weights, as in benchmarks/run.py), batch 32, on the same real
photos decoded once, in alternating rounds (median reported):

- float32: each image scaled to [0, 1] float32 by the decoder (as imgq did before),
  a float32 batch stacked (19 MB) into a float32 ``tf.function``;
- uint8: imgq now: uint8 images stacked (4.8 MB) into the padded batch, staged,
  cast and scaled inside the model's ``tf.function`` (``Classifier.predict``).

Both include the per-image scaling, wherever it runs. Then the host's part alone
(the model not called), which is what a GPU waits on. Last, how many images one
core decodes per second (``decode_image`` to 224x224, one thread): 640x480 photos,
and 12-megapixel camera JPEGs (4032x3024), against what a GPU consumes.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import build_resnet50, write_photos

BATCH = 32
SIZE = (224, 224)


def float32_function(model_dir: Path) -> Any:
    """The model as imgq called it with float32 batches: top-5 and softmax in the graph."""
    import tensorflow as tf

    model = tf.saved_model.load(str(model_dir))

    @tf.function(input_signature=[tf.TensorSpec([BATCH, *SIZE, 3], tf.float32)])
    def infer(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits = tf.cast(model(images), tf.float32)
        top = tf.math.top_k(logits, k=5, sorted=True)
        lse = tf.math.reduce_logsumexp(logits, axis=-1, keepdims=True)
        return top.indices, tf.exp(top.values - lse)

    infer.model = model  # keep the variables alive
    return infer


def float32_path(fn: Any, images: list[Any]) -> None:
    """Scale each image (the decoder's old last step), stack, call, read back."""
    import numpy as np

    scaled = []
    for image in images:
        out = image.astype(np.float32)
        out *= np.float32(1.0 / 255.0)
        scaled.append(out)
    batch = np.asarray(scaled, dtype=np.float32)
    indices, scores = fn(batch)
    indices.numpy(), scores.numpy()


def host_side_ms(clf: Any, images: list[Any], reps: int) -> dict[str, float]:
    """Milliseconds per batch of the host's part alone, the model not called (median):
    float32: scale each image, stack, make a tensor; uint8: stack and stage."""
    import numpy as np
    import tensorflow as tf

    def float32_side() -> None:
        scaled = []
        for image in images:
            out = image.astype(np.float32)
            out *= np.float32(1.0 / 255.0)
            scaled.append(out)
        tf.convert_to_tensor(np.asarray(scaled, dtype=np.float32))

    times: dict[str, list[float]] = {"float32": [], "uint8": []}
    for _ in range(reps):
        for side, run in (("float32", float32_side), ("uint8", lambda: clf.stage(images))):
            start = time.perf_counter()
            run()
            times[side].append((time.perf_counter() - start) * 1000)
    return {side: statistics.median(t) for side, t in times.items()}


def decode_rate(blobs: list[bytes], seconds: float = 5.0) -> float:
    """Images per second one thread decodes (to 224x224) over about ``seconds``."""
    from workers.inputs import decode_image

    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in blobs:
            decode_image(data, SIZE, max_pixels=10**9)
        done += len(blobs)
    return done / (time.perf_counter() - start)


def camera_jpegs(n: int) -> list[bytes]:
    """n 12-megapixel JPEGs (4032x3024, quality 90), upscaled from scikit-image's samples."""
    from PIL import Image
    from skimage import data

    sources = [data.chelsea, data.coffee, data.astronaut]
    out = []
    for i in range(n):
        im = Image.fromarray(sources[i % 3]()).resize((4032, 3024), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=3, help="batches per side per round")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    rounds, batches = (1, 1) if args.quick else (args.rounds, args.batches)

    import numpy as np

    from shared.registry import Activation, ModelSpec
    from workers.classifier import Classifier
    from workers.inputs import decode_image

    work = Path(tempfile.mkdtemp(prefix="imgq-uint8-"))
    model_dir = work / "resnet50"
    build_resnet50(model_dir)
    photos = write_photos(work / "photos", BATCH)
    images = [decode_image(p.read_bytes(), SIZE, max_pixels=10**9) for p in photos]
    spec = ModelSpec("bench", str(model_dir), SIZE, Activation.SOFTMAX, "imagenet1k")
    clf = Classifier(spec, max_batch_size=BATCH).load()
    fn = float32_function(model_dir)
    for _ in range(2):  # trace and warm both
        clf.predict(images)
        float32_path(fn, images)

    per_round: dict[str, list[float]] = {"float32": [], "uint8": []}
    for r in range(rounds):
        order = ["float32", "uint8"] if r % 2 == 0 else ["uint8", "float32"]
        for side in order:
            start = time.perf_counter()
            for _ in range(batches):
                if side == "uint8":
                    clf.predict(images)
                else:
                    float32_path(fn, images)
            per_round[side].append(BATCH * batches / (time.perf_counter() - start))
    ratios = [u / f for u, f in zip(per_round["uint8"], per_round["float32"], strict=True)]
    stack_f32 = np.asarray([i.astype(np.float32) for i in images]).nbytes
    stack_u8 = np.asarray(images).nbytes

    host = host_side_ms(clf, images, 5 if args.quick else 50)
    photo_blobs = [p.read_bytes() for p in photos[:8]]
    camera = camera_jpegs(2 if args.quick else 3)
    seconds = 1.0 if args.quick else 5.0
    rates = {
        "decode_640x480_per_core": decode_rate(photo_blobs, seconds),
        "decode_12mp_per_core": decode_rate(camera, seconds),
    }
    figures = {
        "float32_img_s": statistics.median(per_round["float32"]),
        "uint8_img_s": statistics.median(per_round["uint8"]),
        "uint8_over_float32": statistics.median(ratios),
        "rounds": per_round,
        "batch_bytes_float32": stack_f32,
        "batch_bytes_uint8": stack_u8,
        "host_ms_float32": host["float32"],
        "host_ms_uint8": host["uint8"],
        **rates,
    }
    print(f"model path, ResNet-50 (random weights), batch {BATCH}, {rounds} rounds:")
    print(f"  float32 batches ({stack_f32 / 1e6:.1f} MB)   {figures['float32_img_s']:8.1f} img/s")
    print(f"  uint8 batches ({stack_u8 / 1e6:.1f} MB)      {figures['uint8_img_s']:8.1f} img/s")
    print(
        f"  uint8 / float32 (median)         {figures['uint8_over_float32']:8.3f} "
        f"(rounds {', '.join(f'{x:.3f}' for x in ratios)})"
    )
    print("host side per batch, the model not called (median):")
    print(f"  float32: scale, stack, tensor    {host['float32']:8.2f} ms")
    print(f"  uint8: stack, stage              {host['uint8']:8.2f} ms")
    print("decode to 224x224, one thread:")
    print(f"  640x480 JPEGs                    {rates['decode_640x480_per_core']:8.1f} img/s")
    print(f"  12 MP camera JPEGs (4032x3024)   {rates['decode_12mp_per_core']:8.1f} img/s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

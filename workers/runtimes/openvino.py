"""The OpenVINO runtime (CPU): the SavedModel converted at load, cached on disk.

Conversion goes through a ``tf.function`` around the loaded model (converting the
SavedModel directory fails on resource variables: "VarHandleOp"). The converted
model (OpenVINO IR, float32 weights) is kept under the cache directory, keyed by
the handle (and, for a local SavedModel, its files' size and time), the input and
batch shapes and the OpenVINO version, so a restarted worker reads it instead of
converting again. The precision is applied when the model is compiled for the CPU:
one conversion serves fp32 and bf16, and OpenVINO's own cache of compiled models
(``compiled/`` beside it, keyed by OpenVINO on the model and the precision) makes
that step quick at the next start too.

The converted model takes uint8 images: the cast to float32 and the scaling to
[0, 1] are the first ops of its graph, as in the TensorFlow runtime.

A batch is split across OpenVINO's parallel inference requests (its THROUGHPUT
mode runs one stream per group of cores), and the top-k is taken in NumPy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from shared.modes import Precision
from shared.registry import ModelSpec
from workers.runtimes.base import (
    SCALE,
    ConversionError,
    ModelLoadError,
    check_uint8,
    pooled,
    top_k,
)
from workers.runtimes.tensorflow import (
    DEFAULT_HUB_CACHE_DIR,
    load_savedmodel,
    resolve_callable,
    single_output,
)

log = logging.getLogger(__name__)

# OpenVINO's names for the precisions it runs on the CPU.
INFERENCE_PRECISION = {Precision.FP32: "f32", Precision.BF16: "bf16"}
CACHE_FORMAT = 2  # bump when what is cached changes (2: uint8 input)


def import_openvino() -> Any:
    """The openvino module; ModelLoadError saying how to install it when it is missing."""
    try:
        import openvino
    except ImportError as exc:
        raise ModelLoadError(
            f"runtime 'openvino' needs the openvino package ({exc}); install it with "
            "pip install 'imgq[openvino]', or set runtime = \"tensorflow\""
        ) from None
    return openvino


def _handle_stamp(handle: str) -> list[Any]:
    """What identifies the model's content: the files of a local SavedModel (name, size,
    time), or the handle alone for TF Hub (a published version does not change)."""
    if "://" in handle:
        return [handle]
    root = Path(handle)
    stamp: list[Any] = [str(root.resolve())]
    for name in ("saved_model.pb", "variables/variables.index"):
        try:
            info = (root / name).stat()
        except OSError:
            continue
        stamp.append([name, info.st_size, info.st_mtime_ns])
    return stamp


class OpenVINOBackend:
    """One model converted to OpenVINO and compiled for the CPU in fp32 or bf16."""

    name = "openvino"

    def __init__(
        self,
        spec: ModelSpec,
        *,
        top_k: int,
        precision: Precision,
        max_batch_size: int,
        cache_dir: Path,
        hub_cache_dir: Path = DEFAULT_HUB_CACHE_DIR,
    ) -> None:
        if precision not in INFERENCE_PRECISION:
            raise ValueError(f"OpenVINO runs fp32 or bf16 on the CPU, not {precision}")
        self.spec = spec
        self.top_k = top_k
        self.precision: Precision = precision
        self.max_batch_size = max_batch_size
        self.cache_dir = cache_dir.expanduser()
        self.hub_cache_dir = hub_cache_dir
        self.from_cache = False
        self._requests: list[Any] = []
        self._lock = threading.Lock()

    def cache_key(self, version: str) -> str:
        """The name of this model's folder in the cache."""
        what = {
            "format": CACHE_FORMAT,
            "openvino": version,
            "handle": _handle_stamp(self.spec.handle),
            "input": list(self.spec.input_size),
            "batch": [1, self.max_batch_size],
        }
        # Not the model's name: two names for one SavedModel share one conversion.
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]

    def load(self) -> OpenVINOBackend:
        """Read the converted model from the cache, or convert and cache it; compile it."""
        ov = import_openvino()
        folder = self.cache_dir / self.cache_key(ov.__version__)
        xml = folder / "model.xml"
        core = ov.Core()
        source: Any
        if xml.is_file():
            source = str(xml)
            self.from_cache = True
        else:
            model = self._convert(ov)
            source = str(xml) if self._save(ov, model, folder) else model
        config = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[self.precision],
        }
        if isinstance(source, str):  # OpenVINO's compiled-model cache works from files
            config["CACHE_DIR"] = str(self.cache_dir / "compiled")
        compiled = core.compile_model(source, "CPU", config)
        streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._requests = [compiled.create_infer_request() for _ in range(max(1, streams))]
        return self

    def _convert(self, ov: Any) -> Any:
        """The SavedModel (loaded with TensorFlow) as an OpenVINO model, batch 1..max."""
        import tensorflow as tf

        obj = load_savedmodel(self.spec, self.hub_cache_dir)
        call = resolve_callable(obj)
        height, width = self.spec.input_size

        def forward(pixels: tf.Tensor) -> tf.Tensor:
            images = tf.cast(pixels, tf.float32) / SCALE
            return tf.cast(single_output(call(images)), tf.float32)

        spec = tf.TensorSpec([None, height, width, 3], tf.uint8)
        # The converter sets the root logger to ERROR (and leaves it so when it
        # fails), which would silence the worker's own log: put it back afterwards.
        root = logging.getLogger()
        saved = root.level, list(root.filters), list(root.handlers)
        try:
            model = ov.convert_model(tf.function(forward).get_concrete_function(spec))
            batch = ov.Dimension(1, self.max_batch_size)
            model.reshape({model.inputs[0]: ov.PartialShape([batch, height, width, 3])})
        except Exception as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            rule = [line for line in lines if "No conversion rule" in line]
            why = (rule or lines or [""])[0]
            raise ConversionError(f"{type(exc).__name__}: {why[:300]}") from exc
        finally:
            root.setLevel(saved[0])
            root.filters[:], root.handlers[:] = saved[1], saved[2]
        return model

    def _save(self, ov: Any, model: Any, folder: Path) -> bool:
        """Write the converted model into the cache (atomically); False when it cannot be."""
        staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            staging.mkdir(parents=True, exist_ok=True)
            # Keep float32 weights: fp16 compression would change the fp32 results.
            ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
            try:
                staging.rename(folder)
            except OSError:  # another worker cached it first: theirs is the same model
                shutil.rmtree(staging, ignore_errors=True)
            return (folder / "model.xml").is_file()
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            log.warning(
                "model %s: could not cache the converted model in %s (%s); "
                "it will be converted again at the next start",
                self.spec.name,
                self.cache_dir,
                exc,
            )
            return False

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """The model's raw outputs, the batch split across the parallel requests."""
        parts = np.array_split(batch, min(len(self._requests), batch.shape[0]))
        with self._lock:
            running = list(zip(self._requests, parts, strict=False))
            for request, part in running:
                request.start_async({0: part})
            outputs = []
            error: Exception | None = None
            for request, _ in running:  # wait for every request, even after a failure
                try:
                    request.wait()
                    outputs.append(np.array(request.get_output_tensor(0).data, copy=True))
                except Exception as exc:
                    error = error or exc
        if error is not None:
            raise error
        return np.concatenate(outputs)

    def stage(self, batch: np.ndarray) -> np.ndarray:
        """The uint8 batch itself: OpenVINO reads it where it is (the CPU)."""
        return check_uint8(batch)

    def __call__(self, batch: object) -> tuple[np.ndarray, np.ndarray, int]:
        """Top-k of a uint8 batch of up to the maximum batch size (an embedding model:
        its vectors)."""
        assert isinstance(batch, np.ndarray)
        outputs = self.logits(check_uint8(batch))
        if self.spec.is_embedding:
            return pooled(outputs)
        return top_k(outputs, self.top_k, self.spec.activation)

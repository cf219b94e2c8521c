"""The TensorFlow runtime: the SavedModel called through ``tf.function``, one traced
graph per fixed batch size, top-k computed in the graph.

bf16 (CPU) and fp16 (GPU) are TensorFlow's own graph rewrites of the float32 graph
(oneDNN's bfloat16 and the CUDA float16 auto-mixed-precision passes), so any
SavedModel works. They are set per model, not per process: TensorFlow reads the
graph options of a function call from a thread-local setting at call time, so each
call is made under its model's options.

The model takes uint8 images; the cast to float32 and the scaling to [0, 1] are the
first ops of its graph. On a GPU, ``stage`` copies a batch to the device, so the
batcher copies the next batch while the current one runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shared.modes import Precision
from shared.registry import Activation, ModelSpec
from workers.runtimes.base import SCALE, ModelLoadError, check_uint8

log = logging.getLogger(__name__)

# The Grappler rewrite behind each reduced precision.
REWRITES = {
    Precision.BF16: "auto_mixed_precision_onednn_bfloat16",
    Precision.FP16: "auto_mixed_precision",
}


# Where TF Hub and Kaggle handles are downloaded when nothing else is said
# (the settings' default for TFHUB_CACHE_DIR).
DEFAULT_HUB_CACHE_DIR = Path("~/.cache/imgq/tfhub").expanduser()


def load_savedmodel(spec: ModelSpec, hub_cache_dir: Path) -> Any:
    """The SavedModel of a local directory or a TF Hub / Kaggle handle (downloaded once
    into ``hub_cache_dir``)."""
    import tensorflow as tf

    handle = spec.handle
    if "://" not in handle:
        if not os.path.isdir(handle):
            raise ModelLoadError(f"no SavedModel directory at {handle}")
        return tf.saved_model.load(handle)
    import tensorflow_hub as hub

    # tensorflow_hub takes its cache folder from nowhere but the TFHUB_CACHE_DIR
    # variable (or an absl flag), so it is set here, just before the one call that
    # reads it. The folder comes from the settings, which read a TFHUB_CACHE_DIR the
    # user set, so this only ever writes back the user's own choice or the default.
    os.environ["TFHUB_CACHE_DIR"] = str(hub_cache_dir)
    return hub.load(handle)


def resolve_callable(obj: Any) -> Callable[[Any], Any]:
    """The inference function: the SavedModel's ``__call__``, else its serving signature."""
    if callable(obj):
        return obj
    signatures = getattr(obj, "signatures", {})
    if "serving_default" in signatures:
        return signatures["serving_default"]
    raise ModelLoadError("the SavedModel is not callable and has no 'serving_default' signature")


def single_output(out: Any) -> Any:
    """The model's one output tensor (a dict of one, as serving signatures return, or a tensor)."""
    if isinstance(out, dict):
        if len(out) != 1:
            raise ModelLoadError(f"the model returns several outputs: {sorted(out)}")
        out = next(iter(out.values()))
    return out


def pooled_vectors(out: Any) -> Any:
    """An embedding model's output as float32 vectors ``(n, D)``: its one output, with a
    pooled ``(n, 1, 1, D)`` flattened (what a worker records, and what an exported head
    is applied to)."""
    import tensorflow as tf

    out = tf.cast(single_output(out), tf.float32)
    return tf.reshape(out, [tf.shape(out)[0], -1])


def call_options(precision: Precision) -> Any:
    """TensorFlow's function-call options with the precision's graph rewrite on; None for fp32."""
    rewrite = REWRITES.get(precision)
    if rewrite is None:
        return None
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context

    base = context.context().function_call_options
    config = config_pb2.ConfigProto.FromString(base.config_proto_serialized)
    setattr(config.graph_options.rewrite_options, rewrite, rewriter_config_pb2.RewriterConfig.ON)
    return context.FunctionCallOptions(executor_type=base.executor_type, config_proto=config)


@contextlib.contextmanager
def _options_in_effect(options: Any) -> Iterator[None]:
    """Function calls in this thread run under ``options`` (None: unchanged)."""
    if options is None:
        yield
        return
    from tensorflow.python.eager import context

    ctx = context.context()
    previous = ctx.function_call_options
    ctx.function_call_options = options
    try:
        yield
    finally:
        ctx.function_call_options = previous


class TensorFlowBackend:
    """One SavedModel in TensorFlow, in the given precision, optionally XLA-compiled."""

    name = "tensorflow"
    from_cache = False

    def __init__(
        self,
        spec: ModelSpec,
        *,
        top_k: int,
        precision: Precision = Precision.FP32,
        jit_compile: bool = False,
        hub_cache_dir: Path = DEFAULT_HUB_CACHE_DIR,
    ) -> None:
        if precision is Precision.AUTO:
            raise ValueError("resolve precision 'auto' before loading (workers.hardware)")
        self.spec = spec
        self.top_k = top_k
        self.precision: Precision = precision
        self.jit_compile = jit_compile
        self.hub_cache_dir = hub_cache_dir
        self._fn: Any = None
        self._obj: Any = None
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._options: Any = None
        self.device: str | None = None  # "/GPU:0" when TensorFlow sees a GPU: staged there

    def load(self) -> TensorFlowBackend:
        """Load the SavedModel and build the top-k function around it (an embedding
        model: the function returning its pooled vectors)."""
        import tensorflow as tf

        obj = load_savedmodel(self.spec, self.hub_cache_dir)
        call = resolve_callable(obj)
        self._obj = obj  # keep the SavedModel's variables alive
        activation = self.spec.activation
        top_k = self.top_k

        def infer(pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            # uint8 in: the cast and scaling happen here, on the model's device.
            images = tf.cast(pixels, tf.float32) / SCALE
            logits = tf.cast(single_output(call(images)), tf.float32)
            width = tf.shape(logits)[-1]
            # Rank on the raw outputs, then activate only the top k: both
            # activations are monotonic, and this keeps classes apart that a
            # float32 sigmoid would round to the same 1.0.
            top = tf.math.top_k(logits, k=tf.minimum(top_k, width), sorted=True)
            if activation is Activation.SOFTMAX:
                lse = tf.math.reduce_logsumexp(logits, axis=-1, keepdims=True)
                scores = tf.exp(top.values - lse)
            elif activation is Activation.SIGMOID:
                scores = tf.math.sigmoid(top.values)
            else:
                scores = top.values
            return top.indices, scores, width

        def embed(pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            images = tf.cast(pixels, tf.float32) / SCALE  # uint8 in, as for ``infer``
            vectors = pooled_vectors(call(images))
            n = tf.shape(vectors)[0]
            return vectors, tf.zeros([n, 0], tf.float32), tf.shape(vectors)[-1]

        self._fn = embed if self.spec.is_embedding else infer
        self._options = call_options(self.precision)
        self.device = "/GPU:0" if tf.config.list_logical_devices("GPU") else None
        return self

    def _compiled_for(self, batch: int) -> Any:
        fn = self._compiled.get(batch)
        if fn is None:
            import tensorflow as tf

            with self._lock:
                fn = self._compiled.get(batch)
                if fn is None:
                    height, width = self.spec.input_size
                    spec = tf.TensorSpec([batch, height, width, 3], tf.uint8)
                    fn = tf.function(
                        self._fn, input_signature=[spec], jit_compile=self.jit_compile or None
                    )
                    self._compiled[batch] = fn
        return fn

    def check_xla(self, zeros: np.ndarray) -> None:
        """With XLA on, compile one batch; without XLA from then on when it cannot compile."""
        if not self.jit_compile:
            return
        try:
            self(zeros)
        except Exception as exc:
            # XLA compiles only some graphs (not every op has an XLA kernel):
            # an opt-in speed-up, so the model runs without it rather than not at all.
            log.warning(
                "model %s: XLA cannot compile this SavedModel (%s); running it without XLA",
                self.spec.name,
                str(exc).splitlines()[0][:300],
            )
            self.jit_compile = False
            self._compiled.clear()

    def stage(self, batch: np.ndarray) -> Any:
        """The uint8 batch as a tensor on the model's device (a host-to-GPU copy on a GPU
        host, made in the caller's thread; on a CPU, the array wrapped)."""
        import tensorflow as tf

        check_uint8(batch)
        if self.device is None:
            return tf.convert_to_tensor(batch)
        with tf.device(self.device):
            return tf.identity(tf.convert_to_tensor(batch))

    def __call__(self, batch: Any) -> tuple[np.ndarray, np.ndarray, int]:
        """Top-k of a staged batch (or a uint8 array) whose size is one of the fixed sizes
        (traced once each)."""
        if isinstance(batch, np.ndarray):
            batch = self.stage(batch)
        fn = self._compiled_for(int(batch.shape[0]))
        with _options_in_effect(self._options):
            indices, scores, width = fn(batch)
        return indices.numpy(), scores.numpy(), int(width)

    def seconds_per_call(self, batch: np.ndarray, *, fp32: bool = False) -> float:
        """Seconds of one call on this batch after a first, untimed one; ``fp32``: without
        the precision's graph rewrite (the same function, the default options), which is
        how a warm-up shows whether the rewrite changed anything."""
        import time

        staged = self.stage(batch)
        fn = self._compiled_for(int(staged.shape[0]))
        options = None if fp32 else self._options
        with _options_in_effect(options):
            fn(staged)[0].numpy()
            start = time.perf_counter()
            fn(staged)[0].numpy()
        return time.perf_counter() - start

"""Small TF2 SavedModels that follow TF Hub's image-classification convention,
built by the tests: float32 [batch, height, width, 3] in [0, 1] -> [batch, classes]."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def linear_weights(num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic weights (48 x classes) and bias of the test classifiers."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 4.0, size=(48, num_classes)).astype(np.float32)
    bias = rng.normal(0.0, 0.5, size=(num_classes,)).astype(np.float32)
    return weights, bias


def build_classifier(
    path: Path,
    num_classes: int,
    *,
    output: str = "logits",
    seed: int = 0,
    fail_on_bright: bool = False,
    abort_on_bright: bool = False,
    resize: str = "area",
) -> Path:
    """Save a deterministic linear classifier over a 4x4 colour grid of the image.

    ``output``: "logits" (raw scores), "probs" (softmax applied inside the model),
    or "dict" (logits under a single named output, like a serving signature).
    ``fail_on_bright``: the model raises on a batch holding an all-white image
    (a model error on one input, for poison-input tests).
    ``abort_on_bright``: the process aborts on such an image, as a crashing native
    decoder or driver would (for crash-loop tests).
    """
    import tensorflow as tf

    weights, bias = linear_weights(num_classes, seed)

    class Classifier(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(weights)
            self.b = tf.Variable(bias)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images: tf.Tensor) -> tf.Tensor:
            if fail_on_bright:
                means = tf.reduce_mean(images, axis=[1, 2, 3])
                tf.debugging.assert_less(means, 0.999, message="poison: an all-white image")
            if abort_on_bright:
                means = tf.reduce_mean(images, axis=[1, 2, 3])

                def die() -> tf.Tensor:
                    op = tf.raw_ops.Abort(error_msg="poison: an all-white image killed the process")
                    with tf.control_dependencies([op]):
                        return tf.identity(images)

                images = tf.cond(tf.reduce_any(means >= 0.999), die, lambda: images)
            grid = tf.image.resize(images, [4, 4], method=resize)
            feats = tf.reshape(grid, [-1, 48]) - 0.5
            logits = tf.matmul(feats, self.w) + self.b
            if output == "probs":
                return tf.nn.softmax(logits)
            if output == "dict":
                return {"logits": logits}
            return logits

    module = Classifier()
    tf.saved_model.save(module, str(path))
    return path


def build_linear(path: Path, num_classes: int, *, seed: int = 0) -> Path:
    """Save, for the ``numpy`` runtime, the linear classifier ``build_classifier`` saves
    for TensorFlow (the same weights for the same seed): a worker serving it starts
    without TensorFlow. For the tests of the queue's machinery, where no model is the
    subject."""
    from workers.runtimes.linear import save_linear

    return save_linear(path, *linear_weights(num_classes, seed), grid=4)


def direct_scores(path: Path, images: np.ndarray, activation: str) -> np.ndarray:
    """The model's activated outputs from a direct TensorFlow call (the reference)."""
    import tensorflow as tf

    model = tf.saved_model.load(str(path))
    out = model(tf.constant(images, tf.float32))
    if isinstance(out, dict):
        out = next(iter(out.values()))
    logits = out.numpy().astype(np.float64)
    if activation == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits


def build_embedder(path: Path, dim: int, *, seed: int = 0, pooled_4d: bool = False) -> Path:
    """Save a deterministic feature-vector model, in TF Hub's feature-vector convention:
    float32 [batch, height, width, 3] in [0, 1] -> [batch, dim] (``pooled_4d``:
    [batch, 1, 1, dim], as a model without its final flatten returns).

    The features are soft colour histograms (16 bins per channel, pooled over the
    whole image) projected to ``dim`` with a ReLU: unchanged by rotating the image
    and barely moved by recompressing it, so a photo's copies stay its nearest
    neighbours, while different photos differ.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 1.0, size=(48, dim)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, size=(dim,)).astype(np.float32)
    centres = np.linspace(0.0, 1.0, 16, dtype=np.float32)

    class Embedder(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(weights)
            self.b = tf.Variable(bias)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images: tf.Tensor) -> tf.Tensor:
            # (n, h, w, 3, 1) against (16,): soft bins, averaged over the pixels.
            near = tf.exp(-tf.square(images[..., None] - centres) / 0.005)
            hist = tf.reduce_mean(near, axis=[1, 2])  # (n, 3, 16)
            feats = tf.reshape(hist, [-1, 48]) * 4.0
            out = tf.nn.relu(tf.matmul(feats, self.w) + self.b)
            if pooled_4d:
                return out[:, None, None, :]
            return out

    tf.saved_model.save(Embedder(), str(path))
    return path

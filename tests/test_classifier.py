"""The model lifecycle in-process: load, check, predict; against a direct TensorFlow call."""

from __future__ import annotations

from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.modes import Precision, RuntimeKind
from shared.registry import Activation, ModelSpec, load_registry
from tests.conftest import TEST_MODELS
from tests.savedmodels import build_classifier, direct_scores
from workers.classifier import Classifier, ModelLoadError, batch_buckets
from workers.runtimes.base import to_unit


def spec_for(models_dir: Path, name: str) -> ModelSpec:
    return load_registry(models_dir / "models.toml")[name]


def random_images(n: int, size: int = 32, seed: int = 1) -> np.ndarray:
    """uint8 pixels, as the decoders hand them to a model."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_buckets() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(32) == (1, 2, 4, 8, 12, 16, 24, 32)
    assert batch_buckets(24) == (1, 2, 4, 8, 12, 16, 24)
    assert batch_buckets(128) == (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


@pytest.mark.parametrize("name", list(TEST_MODELS))
def test_top5_matches_a_direct_call(models_dir: Path, name: str) -> None:
    spec = spec_for(models_dir, name)
    clf = Classifier(spec, max_batch_size=8).load()
    classes, _, activation, _ = TEST_MODELS[name]
    assert clf.num_classes == classes == len(clf.labels)
    images = random_images(5)  # padded to the bucket of 8
    preds = clf.predict(images)
    ref = direct_scores(models_dir / name, to_unit(images), activation)
    for row in range(5):
        want = np.argsort(-ref[row], kind="stable")[:5]
        assert list(preds.indices[row]) == list(want)
        np.testing.assert_allclose(preds.scores[row], ref[row][want], rtol=1e-4, atol=1e-6)
        assert all(np.diff(preds.scores[row]) <= 0)  # best first


def test_padding_does_not_change_results(models_dir: Path) -> None:
    clf = Classifier(spec_for(models_dir, "t1001"), max_batch_size=8).load()
    images = random_images(8, seed=7)
    full = clf.predict(images)
    one = clf.predict(images[3:4])
    three = clf.predict(images[:3])
    np.testing.assert_array_equal(one.indices[0], full.indices[3])
    np.testing.assert_array_equal(three.indices, full.indices[:3])
    np.testing.assert_allclose(three.scores, full.scores[:3], rtol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        clf.predict(random_images(9))


def test_softmax_scores_are_probabilities(models_dir: Path) -> None:
    clf = Classifier(spec_for(models_dir, "t1001"), max_batch_size=4).load()
    preds = clf.predict(random_images(4))
    assert clf.spec.activation is Activation.SOFTMAX
    assert np.all((preds.scores > 0) & (preds.scores <= 1))
    assert np.all(preds.scores.sum(axis=1) <= 1 + 1e-6)


def test_missing_savedmodel_fails_with_what_to_do(tmp_path: Path) -> None:
    spec = ModelSpec(
        name="ghost",
        handle=str(tmp_path / "nowhere"),
        input_size=(32, 32),
        activation=Activation.SOFTMAX,
        labels="imagenet1k",
    )
    with pytest.raises(ModelLoadError) as err:
        Classifier(spec, max_batch_size=2).load()
    text = str(err.value)
    assert "'ghost'" in text and str(tmp_path / "nowhere") in text
    assert "TFHUB_CACHE_DIR" in text and "IMGQ_MODELS_FILE" in text


def test_output_width_must_match_labels(models_dir: Path) -> None:
    spec = ModelSpec(
        name="mismatch",
        handle=str(models_dir / "tcustom"),
        input_size=(32, 32),
        activation=Activation.SOFTMAX,
        labels="imagenet1k",
    )
    with pytest.raises(
        ModelLoadError, match="outputs 7 classes but its label set 'imagenet1k' has 1000"
    ):
        Classifier(spec, max_batch_size=2).load()


def test_unreachable_hub_handle_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The download folder is handed to the loader, not read back from the environment:
    the message names the folder given, whatever the variable said before."""
    import time

    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "stale"))
    spec = ModelSpec(
        name="remote",
        handle="https://127.0.0.1:9/tfhub/model/1",
        input_size=(32, 32),
        activation=Activation.SOFTMAX,
        labels="imagenet1k",
    )
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="could not be loaded from handle") as info:
        Classifier(spec, max_batch_size=2, hub_cache_dir=tmp_path / "cache").load()
    assert time.monotonic() - start < 30
    assert f"TFHUB_CACHE_DIR (now {tmp_path / 'cache'})" in str(info.value)


def test_model_error_is_raised_not_hidden(tmp_path: Path) -> None:
    path = build_classifier(tmp_path / "p", 10, fail_on_bright=True)
    labels = tmp_path / "l.txt"
    labels.write_text("\n".join(str(i) for i in range(10)) + "\n", encoding="utf-8")
    spec = ModelSpec(
        name="p",
        handle=str(path),
        input_size=(32, 32),
        activation=Activation.SOFTMAX,
        labels=str(labels),
    )
    clf = Classifier(spec, max_batch_size=4).load()
    images = random_images(2) // 2
    assert clf.predict(images).indices.shape == (2, 5)
    images[1] = 255
    with pytest.raises(Exception, match="poison"):
        clf.predict(images)


def test_xla_compiled_call_gives_the_same_top5(tmp_path: Path) -> None:
    path = build_classifier(tmp_path / "xla", 1000, resize="bilinear")
    spec = ModelSpec(
        name="xla",
        handle=str(path),
        input_size=(32, 32),
        activation=Activation.SOFTMAX,
        labels="imagenet1k",
    )
    plain = Classifier(spec, max_batch_size=4).load()
    xla = Classifier(spec, max_batch_size=4, jit_compile=True).load()
    assert xla.jit_compile
    images = random_images(3, seed=11)
    a, b = plain.predict(images), xla.predict(images)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4)


def test_xla_falls_back_when_the_model_cannot_compile(models_dir: Path) -> None:
    spec = spec_for(models_dir, "t21k")  # area resizing has no XLA kernel
    clf = Classifier(spec, max_batch_size=4, jit_compile=True).load()
    assert not clf.jit_compile
    plain = Classifier(spec, max_batch_size=4).load()
    images = random_images(2, seed=2)
    np.testing.assert_array_equal(clf.predict(images).indices, plain.predict(images).indices)


def test_fp16_switch_keeps_results_on_cpu(models_dir: Path) -> None:
    """The GPU's float16 rewrite, on the CPU: on for the model's calls, same top-5."""
    from workers.runtimes.tensorflow import call_options

    spec = spec_for(models_dir, "t1001")
    before = Classifier(spec, max_batch_size=2).load().predict(random_images(2, seed=5))
    fp16 = Classifier(spec, max_batch_size=2, precision=Precision.FP16).load()
    after = fp16.predict(random_images(2, seed=5))
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2

    config = call_options(Precision.FP16).config_proto_serialized

    rewrites = config_pb2.ConfigProto.FromString(config).graph_options.rewrite_options
    assert rewrites.auto_mixed_precision == rewriter_config_pb2.RewriterConfig.ON
    assert fp16.backend is not None and fp16.backend.precision is Precision.FP16
    np.testing.assert_array_equal(before.indices, after.indices)
    np.testing.assert_allclose(before.scores, after.scores, rtol=1e-3)


def float32_path(path: Path, images: np.ndarray, activation: Activation) -> tuple[Any, Any]:
    """Top-5 and scores as the float32 transport computed them: pixels scaled to [0, 1]
    on the host (the decoder's arithmetic), a float32 batch into the model's function,
    top-k and activation in the graph."""
    import tensorflow as tf

    model = tf.saved_model.load(str(path))
    unit = images.astype(np.float32)
    unit *= np.float32(1.0 / 255.0)

    @tf.function(input_signature=[tf.TensorSpec([None, *images.shape[1:]], tf.float32)])
    def infer(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logits = tf.cast(model(x), tf.float32)
        top = tf.math.top_k(logits, k=5, sorted=True)
        if activation is Activation.SOFTMAX:
            lse = tf.math.reduce_logsumexp(logits, axis=-1, keepdims=True)
            return top.indices, tf.exp(top.values - lse)
        return top.indices, tf.math.sigmoid(top.values)

    indices, scores = infer(unit)
    return indices.numpy(), scores.numpy()


needs_openvino = pytest.mark.skipif(
    find_spec("openvino") is None, reason="the openvino extra is not installed"
)


@pytest.mark.parametrize(
    ("runtime", "name"),
    [
        (RuntimeKind.TENSORFLOW, "t1001"),
        (RuntimeKind.TENSORFLOW, "t21k"),
        (RuntimeKind.TENSORFLOW, "bilinear"),
        pytest.param(RuntimeKind.OPENVINO, "bilinear", marks=needs_openvino),
    ],
)
def test_uint8_batches_match_the_float32_path(
    models_dir: Path, tmp_path: Path, runtime: RuntimeKind, name: str
) -> None:
    """uint8 in, cast and scaled in the model's graph: the same top-5 and scores (1e-6)
    as float32 batches scaled on the host."""
    if name == "bilinear":  # OpenVINO converts bilinear resizing, not area
        path = build_classifier(tmp_path / "m", 1000, resize="bilinear")
        spec = ModelSpec("tbl", str(path), (32, 32), Activation.SOFTMAX, "imagenet1k")
    else:
        spec = spec_for(models_dir, name)
    clf = Classifier(spec, max_batch_size=8, runtime=runtime, cache_dir=tmp_path / "c").load()
    assert clf.backend is not None and clf.backend.name == runtime.value
    images = random_images(8, seed=13)
    got = clf.predict(images)
    indices, scores = float32_path(Path(spec.handle), images, spec.activation)
    np.testing.assert_array_equal(got.indices, indices)
    np.testing.assert_allclose(got.scores, scores, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        clf.predict(to_unit(images))


# -- the numpy runtime ---------------------------------------------------------------
def linear_spec(handle: Path, *, input_size: int = 32, labels: str = "imagenet1k") -> ModelSpec:
    return ModelSpec(
        name="tlin",
        handle=str(handle),
        input_size=(input_size, input_size),
        activation=Activation.SOFTMAX,
        labels=labels,
        runtime=RuntimeKind.NUMPY,
    )


def test_numpy_runtime_gives_the_tensorflow_models_answers(tmp_path: Path) -> None:
    """The same linear model, saved for each runtime by the same seed, answers the same:
    the numpy runtime's pooling is TensorFlow's area resize and its top-k TensorFlow's."""
    from tests.savedmodels import build_linear

    build_classifier(tmp_path / "tf", 1000, seed=5)
    build_linear(tmp_path / "lin.npz", 1000, seed=5)
    tf_spec = replace(linear_spec(tmp_path / "tf"), runtime=None)
    reference = Classifier(tf_spec, max_batch_size=8).load()
    linear = Classifier(
        linear_spec(tmp_path / "lin.npz"), max_batch_size=8, runtime=RuntimeKind.NUMPY
    )
    linear.load()
    assert linear.backend is not None and linear.backend.name == "numpy"
    assert linear.num_classes == 1000
    images = random_images(11, seed=3)  # a full batch and a padded one
    for batch in (images[:8], images[8:]):
        got, want = linear.predict(batch), reference.predict(batch)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-6)


def test_numpy_runtime_load_errors_say_what_is_wrong(tmp_path: Path) -> None:
    from workers.runtimes.linear import save_linear

    weights, bias = np.zeros((48, 1000), np.float32), np.zeros(1000, np.float32)
    save_linear(tmp_path / "ok.npz", weights, bias, grid=4)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    cases = {
        tmp_path / "missing.npz": "no linear model file at",
        tmp_path / "saved_model_dir": "loads a linear model file (.npz",
        tmp_path / "junk.npz": "is not a linear model file",
    }
    for handle, message in cases.items():
        clf = Classifier(linear_spec(handle), max_batch_size=4, runtime=RuntimeKind.NUMPY)
        with pytest.raises(ModelLoadError, match=r"runtime numpy\) could not be loaded") as err:
            clf.load()
        assert message in str(err.value)
    odd = Classifier(
        linear_spec(tmp_path / "ok.npz", input_size=30), max_batch_size=4, runtime=RuntimeKind.NUMPY
    )
    with pytest.raises(ModelLoadError, match="grid \\(4\\) must divide the input size 30x30"):
        odd.load()
    mismatched = Classifier(
        linear_spec(tmp_path / "ok.npz", labels="imagenet1k-background"),
        max_batch_size=4,
        runtime=RuntimeKind.NUMPY,
    )
    with pytest.raises(ModelLoadError, match="outputs 1000 classes but its label set"):
        mismatched.load()
    with pytest.raises(ValueError, match=r"weights must be \(12, outputs\)"):
        save_linear(tmp_path / "bad.npz", weights, bias, grid=2)

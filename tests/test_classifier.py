"""The model lifecycle in-process: load, check, predict; against a direct TensorFlow call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.modes import Precision
from shared.registry import Activation, ModelSpec, load_registry
from tests.conftest import TEST_MODELS
from tests.savedmodels import build_classifier, direct_scores
from workers.classifier import Classifier, ModelLoadError, batch_buckets


def spec_for(models_dir: Path, name: str) -> ModelSpec:
    return load_registry(models_dir / "models.toml")[name]


def random_images(n: int, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)


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
    ref = direct_scores(models_dir / name, images, activation)
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
    import time

    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    spec = ModelSpec(
        name="remote",
        handle="https://127.0.0.1:9/tfhub/model/1",
        input_size=(32, 32),
        activation=Activation.SOFTMAX,
        labels="imagenet1k",
    )
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="could not be loaded from handle"):
        Classifier(spec, max_batch_size=2).load()
    assert time.monotonic() - start < 30


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
    images = random_images(2) * 0.5
    assert clf.predict(images).indices.shape == (2, 5)
    images[1] = 1.0
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

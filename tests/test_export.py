"""``workers.export.export_head``: a head and its embedding model as one SavedModel,
loaded in a separate Python that cannot import imgq, against a reference computed
here (the backbone called directly, then the head's softmax in NumPy), within 1e-5;
the labels round-trip; every refusal has its one line and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.registry import Activation, ModelKind, ModelSpec
from tests.savedmodels import build_embedder
from workers import export as export_mod
from workers.export import ExportError, export_head

DIM = 24
SIZE = 32
LABELS = ["golden retriever", "chat noir", "Schäferhund", "柴犬", "perro de agua español"]

# Run by a separate interpreter: TensorFlow and NumPy only. The imgq packages are
# refused by an import hook, since the editable install would otherwise find them.
LOADER = """
import importlib.abc, json, os, sys

BLOCKED = {"shared", "workers", "producer", "tests"}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"imgq is not importable here: {name}")
        return None

sys.meta_path.insert(0, Refuse())
assert "PYTHONPATH" not in os.environ

import numpy as np
import tensorflow as tf

export, work = sys.argv[1], sys.argv[2]
model = tf.saved_model.load(export)
serve = model.signatures["serving_default"]
(args, kwargs) = serve.structured_input_signature
images = np.load(os.path.join(work, "images.npy"))
out = serve(images=tf.constant(images))
np.save(os.path.join(work, "probabilities.npy"), out["probabilities"].numpy())
np.save(os.path.join(work, "embedding.npy"), out["embedding"].numpy())
with open(model.labels_file.asset_path.numpy().decode("utf-8"), encoding="utf-8") as f:
    asset = f.read()
json.dump(
    {
        "inputs": {k: [v.shape.as_list(), v.dtype.name] for k, v in kwargs.items()},
        "outputs": {
            k: [v.shape.as_list(), v.dtype.name] for k, v in serve.structured_outputs.items()
        },
        "labels": [x.decode("utf-8") for x in model.labels.numpy()],
        "asset": asset,
        "imgq_loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
    },
    open(os.path.join(work, "result.json"), "w", encoding="utf-8"),
    ensure_ascii=False,
)
"""


def spec(path: Path, *, kind: ModelKind = ModelKind.EMBEDDING) -> ModelSpec:
    return ModelSpec(
        name="temb",
        handle=str(path),
        input_size=(SIZE, SIZE),
        activation=Activation.NONE if kind is ModelKind.EMBEDDING else Activation.SOFTMAX,
        labels="" if kind is ModelKind.EMBEDDING else "imagenet1k",
        kind=kind,
    )


def unit_images(n: int, seed: int = 1) -> np.ndarray:
    """Decoded uint8 pixels scaled to [0, 1] as the worker scales them (float32 / 255)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    return pixels.astype(np.float32) / np.float32(255.0)


def direct_vectors(path: Path, images: np.ndarray) -> np.ndarray:
    """The backbone SavedModel called directly, its output flattened to (n, D)."""
    import tensorflow as tf

    out = tf.saved_model.load(str(path))(tf.constant(images)).numpy()
    return out.reshape(out.shape[0], -1)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def head_for(vectors: np.ndarray, k: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A random head scaled so that its logits spread over a few units: probabilities
    neither uniform nor one-hot, so a wrong head or a wrong vector shows."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(vectors.shape[1], k))
    spread = np.std(vectors @ weights)
    weights = (weights * 2.0 / spread).astype(np.float32)
    bias = rng.normal(0.0, 0.5, size=k).astype(np.float32)
    return weights, bias


def load_elsewhere(export: Path, images: np.ndarray, work: Path) -> dict:
    """Load and call the export in a fresh interpreter without imgq; its outputs."""
    work.mkdir()
    np.save(work / "images.npy", images)
    (work / "loader.py").write_text(LOADER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [sys.executable, "-I", str(work / "loader.py"), str(export), str(work)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((work / "result.json").read_text(encoding="utf-8"))
    result["probabilities"] = np.load(work / "probabilities.npy")
    result["embedding"] = np.load(work / "embedding.npy")
    return result


@pytest.mark.parametrize("pooled_4d", [False, True], ids=["flat", "pooled_4d"])
def test_export_runs_without_imgq_and_matches_the_reference(
    tmp_path: Path, pooled_4d: bool
) -> None:
    backbone = build_embedder(tmp_path / "backbone", DIM, seed=3, pooled_4d=pooled_4d)
    images = unit_images(6)
    vectors = direct_vectors(backbone, images)
    assert vectors.shape == (6, DIM)
    weights, bias = head_for(vectors, len(LABELS))
    reference = softmax(vectors.astype(np.float64) @ weights + bias)
    # The head is not trivial: no image is near-certain, none near-uniform.
    top = reference.max(axis=1)
    assert top.min() > 0.3 and top.max() < 0.99

    out = tmp_path / "export"
    got = export_head(spec(backbone), weights, bias, LABELS, out, name="dogs@2")
    assert got == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone", "export"]  # no staging
    shutil.rmtree(backbone)  # standalone: the backbone's folder is no longer needed

    result = load_elsewhere(out, images, tmp_path / "elsewhere")
    assert result["imgq_loaded"] == []
    assert result["inputs"] == {"images": [[None, SIZE, SIZE, 3], "float32"]}
    assert result["outputs"] == {
        "probabilities": [[None, len(LABELS)], "float32"],
        "embedding": [[None, DIM], "float32"],
    }
    assert result["probabilities"].dtype == np.float32
    np.testing.assert_allclose(result["probabilities"], reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result["embedding"], vectors, rtol=0, atol=1e-5)
    assert result["labels"] == LABELS
    assert result["asset"] == "".join(f"{label}\n" for label in LABELS)

    assert (out / "assets" / "labels.txt").read_bytes().decode("utf-8").splitlines() == LABELS
    meta = json.loads((out / "imgq_export.json").read_text(encoding="utf-8"))
    assert meta["name"] == "dogs@2"
    assert meta["base_model"] == {"name": "temb", "handle": str(backbone)}
    assert meta["input_size"] == [SIZE, SIZE]
    assert meta["input"]["shape"] == [None, SIZE, SIZE, 3]
    assert "[0, 1]" in meta["input"]["description"]
    assert meta["labels"] == LABELS
    assert meta["created"].endswith("+00:00")


def test_exported_probabilities_match_the_worker_path(tmp_path: Path) -> None:
    """The worker's fp32 vectors of the same uint8 pixels, through the same head."""
    from workers.classifier import Classifier

    backbone = build_embedder(tmp_path / "backbone", DIM, seed=5, pooled_4d=True)
    pixels = np.random.default_rng(2).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    worker = Classifier(spec(backbone), max_batch_size=4).load().predict(pixels).vectors
    assert worker is not None
    weights, bias = head_for(worker, 3)
    out = export_head(spec(backbone), weights, bias, ["a", "b", "c"], tmp_path / "export")

    import tensorflow as tf

    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    unit = tf.constant(pixels.astype(np.float32) / np.float32(255.0))
    probs = serve(images=unit)["probabilities"].numpy()
    reference = softmax(worker.astype(np.float64) @ weights + bias)
    np.testing.assert_allclose(probs, reference, rtol=0, atol=1e-5)


def test_an_empty_existing_folder_is_used(tmp_path: Path) -> None:
    backbone = build_embedder(tmp_path / "backbone", DIM, seed=3)
    out = tmp_path / "export"
    out.mkdir()
    weights, bias = head_for(np.ones((1, DIM)), 2)
    export_head(spec(backbone), weights, bias, ["x", "y"], out)
    assert (out / "saved_model.pb").is_file() and (out / "imgq_export.json").is_file()


# -- refusals ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embedder(tmp_path_factory.mktemp("backbone") / "flat", DIM, seed=3)


def good_head(k: int = 3) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(DIM, k)).astype(np.float32),
        rng.normal(size=k).astype(np.float32),
        [f"class {i}" for i in range(k)],
    )


def refused(tmp_path: Path, **changes: object) -> str:
    """The one line export_head refuses with; nothing is left in ``tmp_path``."""
    before = sorted(p.name for p in tmp_path.iterdir())
    weights, bias, labels = good_head()
    kwargs: dict = {"weights": weights, "bias": bias, "labels": labels, "out": tmp_path / "out"}
    kwargs.update(changes)
    base = kwargs.pop("base")
    with pytest.raises(ExportError) as info:
        export_head(base, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return message


def test_refuses_a_non_empty_folder(tmp_path: Path, backbone: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = refused(tmp_path, base=spec(backbone))
    assert "already exists and is not empty" in message
    assert (out / "keep.txt").read_text() == "mine"


def test_refuses_a_file_in_the_way(tmp_path: Path, backbone: Path) -> None:
    (tmp_path / "out").write_text("mine")
    assert "is not a folder" in refused(tmp_path, base=spec(backbone))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": np.zeros(DIM, np.float32)}, f"weights must be (D, K), got shape ({DIM},)"),
        ({"bias": np.zeros(4, np.float32)}, "bias must be (3,)"),
        ({"labels": ["a", "b"]}, "the head has 3 classes but 2 labels"),
        ({"labels": ["a", "b", "c", "d"]}, "the head has 3 classes but 4 labels"),
        ({"labels": ["a", "two\nlines", "c"]}, "line break"),
        ({"labels": ["a", "", "c"]}, "is empty"),
        ({"bias": np.array([0.0, np.nan, 0.0], np.float32)}, "NaN or infinite"),
    ],
)
def test_refuses_a_head_of_the_wrong_shape(
    tmp_path: Path, backbone: Path, change: dict, message: str
) -> None:
    assert message in refused(tmp_path, base=spec(backbone), **change)


def test_refuses_a_classification_model(tmp_path: Path, backbone: Path) -> None:
    message = refused(tmp_path, base=spec(backbone, kind=ModelKind.CLASSIFICATION))
    assert "'temb' is a classification model" in message
    assert "embedding model it was trained on" in message


def test_refuses_a_head_for_other_vectors(tmp_path: Path, backbone: Path) -> None:
    weights = np.zeros((DIM + 8, 3), np.float32)
    message = refused(tmp_path, base=spec(backbone), weights=weights)
    assert f"expect {DIM + 8}-d vectors but model 'temb' outputs {DIM}-d vectors" in message


def test_refuses_a_model_that_does_not_load(tmp_path: Path) -> None:
    message = refused(tmp_path, base=spec(tmp_path / "missing"))
    assert "model 'temb' could not be loaded" in message and "no SavedModel directory" in message


def test_a_failed_write_leaves_nothing(
    tmp_path: Path, backbone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: object, **kwargs: object) -> dict:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "_metadata", full_disk)
    message = refused(tmp_path, base=spec(backbone))
    assert "could not write the export" in message and "No space left" in message

"""Embedding models: the registry's ``kind = "embedding"`` (models file and built-ins),
and the pooled vector out of each runtime, against a direct SavedModel call on the
same input (fp32 within 1e-5), through the batcher as classifiers are."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from shared.modes import Precision, RuntimeKind
from shared.registry import (
    BUILTIN_MODELS,
    Activation,
    ModelKind,
    ModelSpec,
    RegistryError,
    load_registry,
)
from shared.schemas import ResultRecord
from tests.savedmodels import build_embedder
from workers.batcher import DynamicBatcher
from workers.classifier import Classifier

DIM = 24

needs_openvino = pytest.mark.skipif(
    find_spec("openvino") is None, reason="the openvino extra is not installed"
)


@pytest.fixture(scope="module")
def embedders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("embedders")
    return {
        "flat": build_embedder(folder / "flat", DIM, seed=3),
        "pooled": build_embedder(folder / "pooled", DIM, seed=3, pooled_4d=True),
    }


def spec(path: Path, name: str = "temb") -> ModelSpec:
    return ModelSpec(
        name=name,
        handle=str(path),
        input_size=(32, 32),
        activation=Activation.NONE,
        labels="",
        kind=ModelKind.EMBEDDING,
    )


def images(n: int, seed: int = 1) -> np.ndarray:
    """uint8 pixels, as the decoders hand them to a model."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def direct(path: Path, batch: np.ndarray) -> np.ndarray:
    """The SavedModel called on the same pixels in [0, 1], as TF Hub models take them."""
    import tensorflow as tf

    unit = batch.astype(np.float32) / np.float32(255.0)
    out = tf.saved_model.load(str(path))(tf.constant(unit)).numpy()
    return out.reshape(out.shape[0], -1)


def test_builtins_are_the_issue_s_feature_vectors() -> None:
    resnet = BUILTIN_MODELS["resnet50_features"]
    assert resnet.kind is ModelKind.EMBEDDING and resnet.is_embedding
    assert resnet.handle == "https://tfhub.dev/tensorflow/resnet_50/feature_vector/1"
    bit = BUILTIN_MODELS["bit_m_r152x4_features"]
    assert bit.handle == "https://tfhub.dev/google/bit/m-r152x4/1"
    for s in (resnet, bit):
        assert s.input_size == (224, 224) and s.labels == ""
    assert not BUILTIN_MODELS["resnet50"].is_embedding


def test_models_file_registers_an_embedding_model_without_labels(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.my_features]\nkind = "embedding"\nhandle = "features"\ninput_size = 32\n'
    )
    got = load_registry(path)["my_features"]
    assert got.kind is ModelKind.EMBEDDING
    assert got.handle == str((tmp_path / "features").resolve())
    assert got.labels == "" and got.activation is Activation.NONE


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('kind = "embedding"\nhandle = "x"\nlabels = "imagenet1k"', "has no labels"),
        ('kind = "vectors"\nhandle = "x"', "kind must be one of"),
        ('handle = "x"', "missing required keys ['labels']"),
    ],
)
def test_models_file_mistakes_get_one_line(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(f"[models.m]\n{table}\n")
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("shape", ["flat", "pooled"])
def test_vectors_equal_a_direct_call_within_1e_5(embedders: dict[str, Path], shape: str) -> None:
    model = Classifier(spec(embedders[shape]), max_batch_size=8).load()
    assert model.dim == DIM and model.labels == ()
    batch = images(5)  # padded to the bucket of 8
    preds = model.predict(batch)
    assert preds.vectors is not None and preds.vectors.dtype == np.float32
    assert preds.vectors.shape == (5, DIM)
    np.testing.assert_allclose(preds.vectors, direct(embedders["flat"], batch), atol=1e-5)
    assert model.predict(batch[:0]).vectors.shape == (0, DIM)  # type: ignore[union-attr]
    model.warm_up()


def test_the_batcher_hands_each_image_its_own_vector(embedders: dict[str, Path]) -> None:
    model = Classifier(spec(embedders["flat"]), max_batch_size=4).load()
    batch = images(10, seed=4)
    batcher = DynamicBatcher(model, max_delay=0.01)
    try:
        futures = batcher.submit(list(batch))
        got = np.stack([f.result(timeout=30).vector for f in futures])  # type: ignore[misc]
    finally:
        batcher.close()
    np.testing.assert_allclose(got, direct(embedders["flat"], batch), atol=1e-5)


@needs_openvino
def test_openvino_vectors_match_tensorflow(embedders: dict[str, Path], tmp_path: Path) -> None:
    model = Classifier(
        spec(embedders["pooled"], name="temb_ov"),
        max_batch_size=8,
        runtime=RuntimeKind.OPENVINO,
        precision=Precision.FP32,
        cache_dir=tmp_path,
    ).load()
    assert model.dim == DIM
    batch = images(6, seed=2)
    preds = model.predict(batch)
    assert preds.vectors is not None
    np.testing.assert_allclose(preds.vectors, direct(embedders["flat"], batch), atol=1e-4)


def embedding_records(n: int, dim: int, *, bad: set[int]) -> tuple[list[ResultRecord], np.ndarray]:
    from shared.contract import embedding_result, error_result
    from shared.schemas import ErrorCode

    vectors = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)
    records = [
        ResultRecord.model_validate(
            error_result("j", f"{i}.jpg", "temb", ErrorCode.NOT_AN_IMAGE, "not an image")
            if i in bad
            else embedding_result("j", f"{i}.jpg", "temb", vectors[i])
        )
        for i in range(n)
    ]
    return records, vectors


def test_parquet_stores_vectors_as_a_fixed_size_float32_list(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from producer import output

    records, vectors = embedding_records(7, 5, bad={2})
    path = tmp_path / "v.parquet"
    assert output.write_parquet(records, path, dim=5) == 7
    table = pq.read_table(path)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 5)
    column = table.column("embedding").to_pylist()
    assert column[2] is None and table.column("error_code").to_pylist()[2] == "not_an_image"
    got = np.array([column[i] for i in range(7) if i != 2], np.float32)
    assert np.array_equal(got, np.delete(vectors, 2, axis=0))
    assert table.column("dim").to_pylist() == [5, 5, None, 5, 5, 5, 5]
    with pytest.raises(ValueError, match="one embedding model per file"):
        output.write_parquet(records, tmp_path / "w.parquet", dim=4)


def test_npy_writes_the_matrix_and_its_names_in_order(tmp_path: Path) -> None:
    from producer import output

    vectors = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    names = ["a.jpg", "b c.jpg", "d/é.png", "e.jpg", "f.jpg"]
    batches = [(names[:2], vectors[:2]), (names[2:], vectors[2:])]
    path = tmp_path / "vectors.npy"
    assert output.write_npy(batches, path, n=5, dim=4) == 5
    assert np.array_equal(np.load(path), vectors)
    assert output.names_path(path) == tmp_path / "vectors.names.txt"
    assert output.names_path(path).read_text(encoding="utf-8").splitlines() == names
    with pytest.raises(ValueError, match="expected 6 vectors"):
        output.write_npy(batches, tmp_path / "short.npy", n=6, dim=4)


def test_the_report_lists_near_duplicate_groups_as_text(tmp_path: Path) -> None:
    from html.parser import HTMLParser

    from producer.report import DuplicatesSection, no_thumbnail, write_html_report

    records, _ = embedding_records(4, 3, bad=set())
    groups = [[f"big{i}.jpg" for i in range(15)], ["a.jpg", "<b>&c.jpg"]]
    out = tmp_path / "r.html"
    write_html_report(
        records,
        out,
        activations={},
        thumbnail=no_thumbnail,
        duplicates=[DuplicatesSection("temb", 0.95, groups)],
    )

    class Text(HTMLParser):
        text = ""

        def handle_data(self, data: str) -> None:
            self.text += data

    page = Text()
    page.feed(out.read_text(encoding="utf-8"))
    assert "Near-duplicates: temb" in page.text
    assert "2 groups of 17 images" in page.text and "0.95" in page.text
    assert "big11.jpg" in page.text and "big12.jpg" not in page.text
    assert "and 3 more" in page.text
    assert "a.jpg, <b>&c.jpg" in page.text  # escaped in the page, read back as given


def _host_has_bf16() -> bool:
    from workers.hardware import detect

    return detect().bf16


@pytest.mark.skipif(not _host_has_bf16(), reason="this CPU runs no bf16")
@pytest.mark.parametrize(
    "runtime",
    [
        RuntimeKind.TENSORFLOW,
        pytest.param(RuntimeKind.OPENVINO, marks=needs_openvino),
    ],
)
def test_bf16_vectors_point_where_the_fp32_ones_do(
    embedders: dict[str, Path], tmp_path: Path, runtime: RuntimeKind
) -> None:
    model = Classifier(
        spec(embedders["flat"], name=f"temb_bf16_{runtime.value}"),
        max_batch_size=8,
        runtime=runtime,
        precision=Precision.BF16,
        cache_dir=tmp_path,
    ).load()
    batch = images(8, seed=5)
    got = model.predict(batch).vectors
    want = direct(embedders["flat"], batch)
    assert got is not None and got.shape == want.shape
    cosines = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosines.min() > 0.99

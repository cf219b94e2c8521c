"""The result cache on a real PostgreSQL: its schema, entries by model identity and
image bytes, exact vectors, purging, and identities that change with the model's
files and settings."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from shared.registry import Activation, ModelKind, ModelSpec
from shared.result_cache import (
    SCHEMA_VERSION,
    CachedResult,
    CacheSchemaError,
    ResultCache,
    current_version,
    files_digest,
    image_digest,
    model_identity,
)
from tests.pg import with_schema


@pytest.fixture
def fresh_url(postgres_url: str) -> Iterator[str]:
    schema = f"imgq_c_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield with_schema(postgres_url.split("?", 1)[0], schema)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def spec(handle: str, kind: ModelKind = ModelKind.EMBEDDING) -> ModelSpec:
    return ModelSpec("m", handle, (32, 32), Activation.NONE, "", kind=kind)


def test_entries_round_trip_exactly_and_purge(fresh_url: str) -> None:
    cache = ResultCache(fresh_url)
    vector = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    top5 = [{"index": 3, "label": "cat", "score": 0.75}]
    a, b, c = (image_digest(x) for x in (b"a", b"b", b"c"))
    cache.put_many("id-emb", "emb", {a: CachedResult(embedding=vector)})
    cache.put_many("id-cls", "cls", {a: CachedResult(top5=top5), b: CachedResult(top5=[])})
    got = cache.get_many("id-emb", [a, b, c])
    assert list(got) == [a]
    assert got[a].embedding is not None and np.array_equal(got[a].embedding, vector)
    assert cache.get_many("id-cls", [a, c])[a].top5 == top5
    # An entry stored again is kept as it was.
    cache.put_many("id-cls", "cls", {a: CachedResult(top5=[])})
    assert cache.get_many("id-cls", [a])[a].top5 == top5
    assert cache.count() == 3 and cache.count("cls") == 2
    assert cache.purge("cls") == 2
    assert cache.count() == 1
    assert cache.purge() == 1


def test_schema_is_versioned_and_a_newer_one_refused(fresh_url: str) -> None:
    ResultCache(fresh_url).check()
    with psycopg.connect(fresh_url, autocommit=True) as conn:
        assert current_version(conn) == SCHEMA_VERSION
        conn.execute("UPDATE imgq_result_cache_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(CacheSchemaError, match="upgrade imgq"):
        ResultCache(fresh_url).check()


def test_identity_changes_with_the_model_files_and_the_settings(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "v.data").write_bytes(b"\x00" * 64)
    settings = {"precision": "fp32", "runtime": "tensorflow", "decode": "fast", "top_k": 5}
    first = model_identity(spec(str(folder)), **settings)  # type: ignore[arg-type]
    assert first == model_identity(spec(str(folder)), **settings)  # type: ignore[arg-type]
    for change in ({"precision": "bf16"}, {"runtime": "openvino"}, {"decode": "exact"}):
        assert model_identity(spec(str(folder)), **{**settings, **change}) != first  # type: ignore[arg-type]
    assert model_identity(spec(str(folder), ModelKind.CLASSIFICATION), **settings) != first  # type: ignore[arg-type]
    before = files_digest(folder)
    (folder / "variables" / "v.data").write_bytes(b"\x01" + b"\x00" * 63)  # same size
    assert files_digest(folder) != before
    assert model_identity(spec(str(folder)), **settings) != first  # type: ignore[arg-type]
    hub = spec("https://tfhub.dev/tensorflow/resnet_50/feature_vector/1")
    assert model_identity(hub, **settings) != first  # type: ignore[arg-type]


def test_a_cached_record_is_the_fresh_one_and_a_changed_model_file_misses(
    fresh_url: str, tmp_path: Path
) -> None:
    from shared.contract import embedding_result, error_result
    from shared.schemas import ErrorCode
    from tests.savedmodels import build_embedder
    from workers.cache import WorkerCache, record_of
    from workers.classifier import Classifier

    folder = build_embedder(tmp_path / "emb", 8, seed=1)
    model = Classifier(spec(str(folder)), max_batch_size=4).load()
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    data = [images[0].tobytes(), images[1].tobytes(), None]  # the third could not be read
    vectors = model.predict(images[:2]).vectors
    assert vectors is not None
    fresh = [
        embedding_result("j", "a.png", "m", vectors[0]),
        embedding_result("j", "b.png", "m", vectors[1]),
        error_result("j", "c.png", "m", ErrorCode.NOT_FOUND, "gone"),
    ]
    cache = WorkerCache.for_models(fresh_url, {"m": model}, {"m": "fast"})
    first = cache.lookup("m", data)
    assert first.hits == {} and first.digests[2] is None
    cache.store("m", first, fresh, computed=[0, 1, 2])
    again = cache.lookup("m", data)
    assert sorted(again.hits) == [0, 1]
    for i in (0, 1):
        assert record_of("j", f"{'ab'[i]}.png", "m", again.hits[i]) == fresh[i]
    # The same SavedModel with one weight file changed: another identity, no hits.
    variables = next((folder / "variables").glob("*.data-*"))
    raw = bytearray(variables.read_bytes())
    raw[-1] ^= 1
    variables.write_bytes(bytes(raw))
    changed = WorkerCache.for_models(fresh_url, {"m": model}, {"m": "fast"})
    assert changed.identities["m"] != cache.identities["m"]
    assert changed.lookup("m", data).hits == {}


def test_a_classifier_record_comes_back_the_same_through_an_entry(fresh_url: str) -> None:
    from shared.contract import ok_result
    from workers.cache import entry_of, record_of

    labels = ["cat", "dog", "emu"]
    record = ok_result("j", "x.jpg", "c", [2, 0], [0.7071067690849304, 1e-9], labels)
    entry = entry_of(record)
    assert entry is not None
    cache = ResultCache(fresh_url)
    digest = image_digest(b"x")
    cache.put_many("cls", "c", {digest: entry})
    assert record_of("j", "x.jpg", "c", cache.get_many("cls", [digest])[digest]) == record

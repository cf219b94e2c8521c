"""The vector store on a real PostgreSQL with pgvector: schema and its versions, exact
float32 round trips, idempotent chunk writes, streaming reads, the HNSW index of
each method (halfvec, binary quantization, subvector) with exact re-ranking,
near-duplicate groups, deletion, and a server without the extension."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import psycopg
import pytest

from shared.vectors import (
    SCHEMA_VERSION,
    VectorSchemaError,
    VectorStore,
    VectorStoreError,
    current_version,
    ensure_schema,
    set_table,
)

pytest_plugins = ["tests.vectors_pg"]


def job() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


def clustered(
    n: int, dim: int, *, clusters: int = 10, spread: float = 0.3, seed: int = 0
) -> np.ndarray:
    """``n`` float32 vectors around ``clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    which = rng.integers(0, clusters, n)
    return (centres[which] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def cosine(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    m = matrix.astype(np.float64)
    q = query.astype(np.float64)
    return (m @ q) / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))


@pytest.fixture
def store(fresh_vectors_url: str) -> VectorStore:
    return VectorStore(fresh_vectors_url)


def test_schema_is_created_once_versioned_and_a_newer_one_refused(fresh_vectors_url: str) -> None:
    with psycopg.connect(fresh_vectors_url, autocommit=True) as conn:
        assert current_version(conn) == 0
        assert ensure_schema(conn) == 0
        assert ensure_schema(conn) == SCHEMA_VERSION
        conn.execute("UPDATE imgq_vectors_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(VectorSchemaError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        VectorStore(fresh_vectors_url).check()


def test_schema_is_created_once_by_processes_starting_together(fresh_vectors_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            VectorStore(fresh_vectors_url).check()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(fresh_vectors_url) as conn:
        assert current_version(conn) == SCHEMA_VERSION


def test_a_server_without_pgvector_gets_one_line_naming_create_extension(
    postgres_url: str,
) -> None:
    from tests.vectors_pg import has_pgvector

    if has_pgvector(postgres_url):
        pytest.skip("this PostgreSQL has pgvector")
    with pytest.raises(VectorStoreError) as info:
        VectorStore(postgres_url).check()
    message = str(info.value)
    assert "\n" not in message
    assert "CREATE EXTENSION vector" in message
    assert "pgvector" in message


def test_vectors_come_back_bit_for_bit_in_order_and_writes_are_idempotent(
    store: VectorStore,
) -> None:
    j = job()
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((10, 48)).astype(np.float32)
    vectors[3] = np.float32(1e-30)  # tiny values survive too
    names = [f"img{i}.jpg" for i in range(10)]
    # Chunks out of order; the second chunk twice (a redelivered task).
    assert store.write_chunk(j, "emb", 5, names[5:], list(vectors[5:])) == 5
    assert store.write_chunk(j, "emb", 0, names[:5], list(vectors[:5])) == 5
    assert store.write_chunk(j, "emb", 5, names[5:], list(vectors[5:])) == 5
    matrix, got = store.matrix(j, "emb")
    assert got == names
    assert matrix.dtype == np.float32
    assert np.array_equal(matrix, vectors)
    assert store.count(j, "emb") == 10
    # A rewrite where an image now failed removes its vector; the rest stay.
    again = list(vectors[:5])
    again[2] = None  # type: ignore[call-overload]
    assert store.write_chunk(j, "emb", 0, names[:5], again) == 4
    matrix, got = store.matrix(j, "emb")
    assert got == names[:2] + names[3:]
    assert np.array_equal(matrix, np.delete(vectors, 2, axis=0))
    position, vector = store.vector_of(j, "emb", "img7.jpg")
    assert position == 7
    assert np.array_equal(vector, vectors[7])


def test_reads_stream_in_batches_and_sets_are_per_model(store: VectorStore) -> None:
    j = job()
    a = clustered(7, 16)
    b = clustered(7, 32, seed=2)
    names = [f"x/{i}.png" for i in range(7)]
    store.write_chunk(j, "small", 0, names, list(a))
    store.write_chunk(j, "large", 0, names, list(b))
    batches = list(store.iter_batches(j, "small", batch=3))
    assert [len(x.images) for x in batches] == [3, 3, 1]
    assert np.concatenate([x.positions for x in batches]).tolist() == list(range(7))
    assert np.array_equal(np.concatenate([x.matrix for x in batches]), a)
    assert {s.model: s.dim for s in store.sets(j)} == {"large": 32, "small": 16}
    with pytest.raises(ValueError, match="stores 16-dimensional"):
        store.write_chunk(j, "small", 7, ["y.png"], [np.zeros(32, np.float32)])
    # A chunk of failures only, for a model with no vectors yet, creates nothing.
    assert store.write_chunk(j, "none", 0, ["bad.png"], [None]) == 0
    assert store.get_set(j, "none") is None


def test_writers_racing_to_create_one_set_all_succeed(store: VectorStore) -> None:
    j = job()
    vectors = clustered(40, 8)
    errors: list[BaseException] = []

    def write(first: int) -> None:
        try:
            own = VectorStore(store.url)
            own.write_chunk(
                j,
                "m",
                first,
                [f"{first + i}" for i in range(10)],
                list(vectors[first : first + 10]),
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(f,)) for f in (0, 10, 20, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    matrix, _ = store.matrix(j, "m")
    assert np.array_equal(matrix, vectors)


def test_similar_uses_the_index_and_returns_exact_similarities(store: VectorStore) -> None:
    j = job()
    data = clustered(400, 64, clusters=8)
    store.write_chunk(j, "m", 0, [f"{i}.jpg" for i in range(400)], list(data))
    vset = store.build_index(j, "m")
    assert vset.method == "halfvec" and vset.indexed_at is not None
    # A slightly changed copy of image 17 finds image 17 first.
    query = data[17] + 0.01 * np.random.default_rng(5).standard_normal(64).astype(np.float32)
    near = store.similar(j, "m", query, k=10)
    assert near[0].image == "17.jpg"
    assert [n.similarity for n in near] == sorted((n.similarity for n in near), reverse=True)
    expected = cosine(data, query)
    for n in near:
        assert abs(n.similarity - expected[n.position]) < 1e-6
    exact = store.exact_similar(j, "m", query, k=10)
    assert len({n.position for n in near} & {n.position for n in exact}) >= 9
    # Searching from one of the job's images leaves it out.
    own = store.similar_to(j, "m", "17.jpg", k=5)
    assert len(own) == 5 and 17 not in {n.position for n in own}
    with psycopg.connect(store.url) as conn:
        # 400 rows are cheaper to scan: the test asks whether the index can serve.
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                f"EXPLAIN SELECT position FROM {vset.table} "
                f"ORDER BY embedding::halfvec(64) <=> '[{','.join(['0.5'] * 64)}]'::halfvec(64) "
                "LIMIT 5"
            )
        )
    assert f"{vset.table}_ann" in plan


@pytest.mark.parametrize("method", ["binary", "subvector"])
def test_more_than_4000_dimensions_are_indexed_and_reranked_exactly(
    store: VectorStore, method: str
) -> None:
    j = job()
    dim = 8192
    data = clustered(120, dim, clusters=6, spread=0.5, seed=3)
    store.write_chunk(j, "big", 0, [f"{i}" for i in range(120)], list(data))
    if method == "binary":
        vset = store.build_index(j, "big")  # the default past 4,000 dimensions
    else:
        vset = store.build_index(j, "big", method=method)
    assert vset.method == method
    for probe in (0, 33, 99):
        query = data[probe] + 0.05 * np.random.default_rng(probe).standard_normal(dim).astype(
            np.float32
        )
        near = store.similar(j, "big", query, k=10)
        exact = store.exact_similar(j, "big", query, k=10)
        assert near[0].position == probe
        assert len({n.position for n in near} & {n.position for n in exact}) >= 9
        expected = cosine(data, query)
        assert all(abs(n.similarity - expected[n.position]) < 1e-5 for n in near)
    storage = store.storage_bytes(j, "big")
    assert storage["table"] >= 120 * dim * 4  # float32, uncompressed


def test_the_index_is_built_on_first_query_and_once(store: VectorStore) -> None:
    j = job()
    data = clustered(50, 12)
    store.write_chunk(j, "m", 0, [str(i) for i in range(50)], list(data))
    assert store.get_set(j, "m").indexed_at is None  # type: ignore[union-attr]
    store.similar(j, "m", data[0], k=3)
    first = store.get_set(j, "m")
    assert first is not None and first.indexed_at is not None
    assert store.build_index(j, "m").indexed_at == first.indexed_at
    # Vectors written after the build (a resumed job) are found through the index.
    extra = clustered(1, 12, seed=9)[0] * 50
    store.write_chunk(j, "m", 50, ["late"], [extra])
    assert store.similar(j, "m", extra, k=1)[0].image == "late"


def test_duplicates_group_the_copies_and_nothing_else(store: VectorStore) -> None:
    j = job()
    rng = np.random.default_rng(11)
    dim = 96
    originals = rng.standard_normal((30, dim)).astype(np.float32)
    names = [f"photo{i}.jpg" for i in range(30)]
    vectors = list(originals)
    # photo3 has three near copies, photo8 one; each copy is a small change.
    for src, copies in ((3, 3), (8, 1)):
        for c in range(copies):
            names.append(f"photo{src}-copy{c}.jpg")
            vectors.append(originals[src] + 0.05 * rng.standard_normal(dim).astype(np.float32))
    store.write_chunk(j, "m", 0, names, vectors)
    groups = store.duplicates(j, "m", threshold=0.95)
    assert [g.images for g in groups] == [
        ["photo3.jpg", "photo3-copy0.jpg", "photo3-copy1.jpg", "photo3-copy2.jpg"],
        ["photo8.jpg", "photo8-copy0.jpg"],
    ]
    assert store.duplicates(j, "m", threshold=0.9999) == []
    with pytest.raises(ValueError, match="between -1 and 1"):
        store.duplicates(j, "m", threshold=1.5)


def test_delete_job_drops_its_sets_only(store: VectorStore) -> None:
    j, other = job(), job()
    store.write_chunk(j, "a", 0, ["1", "2"], list(clustered(2, 8)))
    store.write_chunk(j, "b", 0, ["1"], list(clustered(1, 4)))
    store.write_chunk(other, "a", 0, ["1"], list(clustered(1, 8)))
    assert store.delete_job(j) == 3
    assert store.sets(j) == []
    assert store.count(other, "a") == 1
    with psycopg.connect(store.url) as conn:
        gone = conn.execute("SELECT to_regclass(%s)", (set_table(j, "a"),)).fetchone()
    assert gone == (None,)
    with pytest.raises(KeyError):
        store.similar(j, "a", np.ones(8, np.float32))


def test_result_rows_come_back_with_their_vectors_as_exact_json(store: VectorStore) -> None:
    import json

    from shared.contract import embedding_result, error_result
    from shared.pg_schema import ensure_schema as ensure_results_schema
    from shared.results_store import PostgresResultsStore
    from shared.schemas import ErrorCode
    from shared.vectors import results_with_vectors_sql

    j = job()
    rng = np.random.default_rng(4)
    a = (rng.standard_normal((3, 6)) * 10.0 ** rng.integers(-8, 8, (3, 6))).astype(np.float32)
    b = rng.standard_normal((3, 4)).astype(np.float32)
    records = {
        "ea": [embedding_result(j, f"{i}.jpg", "ea", a[i]) for i in range(3)],
        "eb": [embedding_result(j, f"{i}.jpg", "eb", b[i]) for i in range(3)],
    }
    records["eb"][1] = error_result(j, "1.jpg", "eb", ErrorCode.TRUNCATED, "cut short")
    results = PostgresResultsStore(store.url)
    for model, chunk in records.items():
        results.write_chunk(j, model, 0, chunk)
        store.write_records(j, model, 0, chunk)
    with psycopg.connect(store.url) as conn:
        ensure_results_schema(conn)
        rows = conn.execute(
            results_with_vectors_sql("imgq_results", store.sets(j)), (j,)
        ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [(p, m) for p in range(3) for m in ("ea", "eb")]
    for position, model, _source, _top5, code, _message, text in rows:
        if model == "eb" and position == 1:
            assert code == "truncated" and text is None
            continue
        want = (a if model == "ea" else b)[position]
        assert np.array_equal(np.array(json.loads(text), np.float32), want)

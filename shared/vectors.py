"""Embeddings in PostgreSQL with pgvector: stored exactly, searched by an HNSW index.

One *set* of vectors per job and embedding model, in a table of its own
(``imgq_vec_<hash>``: image position, image as submitted, ``vector(D)``), listed in
``imgq_vector_sets``. Workers write a chunk's vectors (idempotent on job, position and
model); producers read them back in submission order (a matrix and the names, in
batches), search them, group near-duplicates, and delete them with the job.

Precision. The vectors are stored as ``vector`` (float32): what the model returned,
bit for bit. ``halfvec`` (float16) would halve the bytes but moves each component
by up to 2^-11 of its size (about 5e-4 relative), fifty times the 1e-5 the records
promise; so half precision is used where it costs nothing in exactness: in the
index, which only proposes candidates.

The index, built when the job finishes (or on the first query), one of
:data:`METHODS`, chosen by dimension:

- ``halfvec`` (up to 4,000 dimensions, pgvector's HNSW limit for ``halfvec``): HNSW
  over ``embedding::halfvec(D)`` with ``halfvec_cosine_ops``;
- ``binary`` (more dimensions, e.g. BiT's 8,192): HNSW over
  ``binary_quantize(embedding)::bit(D)`` with ``bit_hamming_ops`` (up to 64,000);
- ``subvector`` (measured against ``binary``): HNSW over the first 4,000 components
  as ``halfvec``.

Every search re-ranks the index's candidates by the exact cosine distance of the
float32 vectors, so the similarities returned are exact and only recall depends on
the index (``docs/benchmarks.md`` has the measurements behind the choice).

A table per set rather than one shared table: each set has one dimension (a typed
``vector(D)`` column, an index of its own without partial-index predicates), a job's
reads never lock another job's writes, and deleting a job drops its tables.

The extension must exist in the database (``CREATE EXTENSION vector``, as a
superuser or the database owner) or be creatable by the user; its schema must be on
the connection's search path.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from shared.pg_schema import migrate, table_version

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SETS_TABLE = "imgq_vector_sets"
VERSION_TABLE = "imgq_vectors_schema"
# Any constant shared by every imgq process ("imgv"): the key of the schema's advisory lock.
_LOCK_KEY = 0x696D6776
# pgvector 0.7 brought halfvec, bit indexes, binary_quantize and subvector.
MIN_PGVECTOR = (0, 7, 0)
# The limits of pgvector's types and HNSW indexes.
MAX_DIM = 16000
HALFVEC_INDEX_MAX_DIM = 4000
BIT_INDEX_MAX_DIM = 64000
# Rows read per round trip when streaming a set back.
FETCH_ROWS = 2000

Method = Literal["halfvec", "binary", "subvector"]
METHODS: tuple[Method, ...] = ("halfvec", "binary", "subvector")
# Candidates the index proposes per query before the exact re-ranking, by method:
# measured for recall@10 >= 0.95 (docs/benchmarks.md).
CANDIDATES: dict[str, int] = {"halfvec": 100, "binary": 200, "subvector": 40}
# HNSW build parameters (pgvector's defaults) and the build's working memory.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
BUILD_MEMORY = "1GB"

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""CREATE TABLE {SETS_TABLE} (
            job_id        text        NOT NULL,
            model         text        NOT NULL,
            table_name    text        NOT NULL UNIQUE,
            dim           integer     NOT NULL,
            method        text,
            indexed_at    timestamptz,
            index_build_s real,
            created_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (job_id, model)
        )""",
    ),
}


class VectorStoreError(RuntimeError):
    """The vector store cannot be used (one line, no password, with what to do)."""


class VectorSchemaError(VectorStoreError):
    """The vector tables' schema is newer than this imgq knows."""


def default_method(dim: int) -> Method:
    """The index method for vectors of ``dim`` dimensions."""
    return "halfvec" if dim <= HALFVEC_INDEX_MAX_DIM else "binary"


def set_table(job_id: str, model: str) -> str:
    """The table name of a job's vectors of one model (a hash: any job id or model name)."""
    digest = hashlib.sha1(f"{job_id}\0{model}".encode()).hexdigest()[:24]
    return f"imgq_vec_{digest}"


# --- pgvector's binary format ------------------------------------------------------------
class Vec:
    """A float32 vector as a query parameter (sent as pgvector's binary ``vector``)."""

    __slots__ = ("array",)

    def __init__(self, array: Any) -> None:
        self.array = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)


def _dump_vector(array: np.ndarray) -> bytes:
    # pgvector's binary send format: dim (int16), unused (int16), float32s, big-endian.
    return struct.pack(">HH", array.size, 0) + array.astype(">f4").tobytes()


def _load_vector(data: Any) -> np.ndarray:
    dim = struct.unpack_from(">H", data)[0]
    return np.frombuffer(data, dtype=">f4", count=dim, offset=4).astype(np.float32)


def register_vector(conn: Any) -> None:
    """Teach ``conn`` pgvector's ``vector``: :class:`Vec` in, float32 arrays out (binary)."""
    from psycopg.adapt import Dumper, Loader
    from psycopg.pq import Format
    from psycopg.types import TypeInfo

    info = TypeInfo.fetch(conn, "vector")
    if info is None:
        raise VectorStoreError("the vector type is not on the search path")

    class VecDumper(Dumper):
        format = Format.BINARY
        oid = info.oid

        def dump(self, obj: Any) -> bytes:
            return _dump_vector(obj.array)

    class VecLoader(Loader):
        format = Format.BINARY

        def load(self, data: Any) -> np.ndarray:
            return _load_vector(bytes(data))

    conn.adapters.register_dumper(Vec, VecDumper)
    conn.adapters.register_loader(info.oid, VecLoader)


# --- the schema -------------------------------------------------------------------------
def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def _ensure_extension(conn: Any) -> str:
    """pgvector in the database (created when the user may), on the search path; its version."""
    import psycopg

    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is None:
        try:
            with conn.transaction():
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split())
            database = conn.info.dbname
            raise VectorStoreError(
                f"PostgreSQL has no pgvector extension in database {database!r} ({reason}): "
                f"install pgvector on the server, then run CREATE EXTENSION vector; in "
                f"{database!r} as a superuser (or the database owner)"
            ) from None
        row = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()
    version = str(row[0])
    if _version_tuple(version) < MIN_PGVECTOR:
        need = ".".join(map(str, MIN_PGVECTOR))
        raise VectorStoreError(
            f"pgvector {version} is too old (imgq needs {need} or newer for halfvec and "
            "binary quantization): ALTER EXTENSION vector UPDATE; after upgrading pgvector"
        )
    found = conn.execute("SELECT to_regtype('vector') IS NOT NULL").fetchone()
    if not found or not found[0]:
        schema = conn.execute(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n "
            "ON n.oid = e.extnamespace WHERE e.extname = 'vector'"
        ).fetchone()
        raise VectorStoreError(
            f"the vector extension lives in schema {schema[0] if schema else '?'!r}, which is "
            "not on this connection's search_path: add it (options=-csearch_path=...)"
        )
    return version


def current_version(conn: Any) -> int:
    """The vector schema's version in the database, 0 when there are no vector tables yet."""
    return table_version(conn, VERSION_TABLE)


def ensure_schema(conn: Any) -> int:
    """The extension, then the vector tables created or migrated to :data:`SCHEMA_VERSION`
    in one transaction under an advisory lock; the version found before.

    ``conn`` is an autocommit psycopg connection.
    """

    def refuse(found: int) -> None:
        raise VectorSchemaError(
            f"the vector tables are at schema version {found}, newer than the "
            f"{SCHEMA_VERSION} this imgq knows: upgrade imgq on this host"
        )

    return migrate(
        conn,
        version_table=VERSION_TABLE,
        lock_key=_LOCK_KEY,
        migrations=MIGRATIONS,
        target=SCHEMA_VERSION,
        refuse=refuse,
        before=_ensure_extension,
    )


# --- what the store returns -------------------------------------------------------------
@dataclass(frozen=True)
class VectorSet:
    """One job's vectors of one model: where they are and how they are indexed."""

    job_id: str
    model: str
    table: str
    dim: int
    method: str | None
    indexed_at: Any = None
    index_build_s: float | None = None


@dataclass(frozen=True)
class VectorBatch:
    """Consecutive stored vectors of a set, in submission order."""

    positions: np.ndarray  # int64, job positions
    images: list[str]  # as submitted
    matrix: np.ndarray  # float32, len(images) x dim


@dataclass(frozen=True)
class Neighbor:
    """An image of the job and its cosine similarity to the query."""

    position: int
    image: str
    similarity: float


@dataclass(frozen=True)
class DuplicateGroup:
    """Images whose vectors are linked, pair by pair, within the threshold."""

    positions: list[int]
    images: list[str]


def _index_sql(method: str, dim: int) -> tuple[str, str, str, str]:
    """(indexed expression over ``embedding``, operator class, distance operator,
    the same expression over a query placeholder ``{q}``)."""
    if method == "halfvec":
        if dim > HALFVEC_INDEX_MAX_DIM:
            raise ValueError(f"halfvec indexes take up to {HALFVEC_INDEX_MAX_DIM} dimensions")
        return (
            f"(embedding::halfvec({dim}))",
            "halfvec_cosine_ops",
            "<=>",
            f"({{q}}::halfvec({dim}))",
        )
    if method == "binary":
        return (
            f"(binary_quantize(embedding)::bit({dim}))",
            "bit_hamming_ops",
            "<~>",
            f"(binary_quantize({{q}})::bit({dim}))",
        )
    if method == "subvector":
        n = min(dim, HALFVEC_INDEX_MAX_DIM)
        return (
            f"(subvector(embedding, 1, {n})::halfvec({n}))",
            "halfvec_cosine_ops",
            "<=>",
            f"(subvector({{q}}, 1, {n})::halfvec({n}))",
        )
    raise ValueError(f"unknown index method {method!r}; one of {', '.join(METHODS)}")


def _candidates_sql(vset: VectorSet, q: str, limit: str, alias: str = "") -> str:
    """A subquery of the index's candidates nearest to the vector expression ``q``."""
    expr, _ops, op, query_expr = _index_sql(vset.method or default_method(vset.dim), vset.dim)
    prefix = f"{alias}." if alias else ""
    expr = expr.replace("embedding", f"{prefix}embedding")
    return (
        f"SELECT {prefix}position, {prefix}source, {prefix}embedding "
        f"FROM {vset.table} {alias} ORDER BY {expr} {op} {query_expr.format(q=q)} LIMIT {limit}"
    )


def _ef_search(candidates: int) -> int:
    # hnsw.ef_search bounds what one index scan returns (1 to 1000).
    return max(40, min(1000, candidates))


# --- the store --------------------------------------------------------------------------
class VectorStore:
    """A job's embeddings in PostgreSQL; one connection per thread.

    ``url`` is a PostgreSQL URL (``IMGQ_RESULTS_URL``). Methods raise
    VectorStoreError (one line) when the server cannot be used.
    """

    def __init__(self, url: str, *, connect_timeout: int = 10) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._ready = False
        self._lock = threading.Lock()
        self._sets: dict[tuple[str, str], VectorSet] = {}

    # connections
    def connect(self) -> Any:
        """A new autocommit connection that knows the vector type (once the schema is ready)."""
        import psycopg

        from shared.results_store import explain_connect_error

        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=self.connect_timeout,
                application_name="imgq-vectors",
            )
        except psycopg.Error as exc:
            # The driver's error stays the cause: callers retry what a reconnect can cure.
            raise VectorStoreError(explain_connect_error(exc, self.url)) from exc
        if self._ready:
            register_vector(conn)
        return conn

    def _conn(self) -> Any:
        self.check()
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self.connect()
            self._local.conn = conn
        return conn

    def check(self) -> None:
        """Connect, create the extension (when allowed) and the tables (once per process)."""
        from shared.results_store import redact_url

        with self._lock:
            if self._ready:
                return
            conn = self.connect()
            try:
                ensure_schema(conn)
            except VectorStoreError as exc:
                raise type(exc)(f"vector store {redact_url(self.url)}: {exc}") from None
            finally:
                conn.close()
            self._ready = True

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    # sets
    def get_set(self, job_id: str, model: str) -> VectorSet | None:
        """The job's set of ``model``, None when no vector of it was written."""
        row = (
            self._conn()
            .execute(
                f"SELECT table_name, dim, method, indexed_at, index_build_s FROM {SETS_TABLE} "
                "WHERE job_id = %s AND model = %s",
                (job_id, model),
            )
            .fetchone()
        )
        if row is None:
            return None
        return VectorSet(job_id, model, row[0], int(row[1]), row[2], row[3], row[4])

    def sets(self, job_id: str) -> list[VectorSet]:
        """The job's sets, by model name."""
        rows = (
            self._conn()
            .execute(
                f"SELECT model, table_name, dim, method, indexed_at, index_build_s "
                f"FROM {SETS_TABLE} WHERE job_id = %s ORDER BY model",
                (job_id,),
            )
            .fetchall()
        )
        return [VectorSet(job_id, r[0], r[1], int(r[2]), r[3], r[4], r[5]) for r in rows]

    def _require_set(self, job_id: str, model: str) -> VectorSet:
        vset = self.get_set(job_id, model)
        if vset is None:
            raise KeyError(f"job {job_id} has no vectors of model {model}")
        return vset

    def _ensure_set(self, conn: Any, job_id: str, model: str, dim: int) -> VectorSet:
        """The set's table, created under a lock of its own when it is new."""
        key = (job_id, model)
        vset = self._sets.get(key)
        if vset is None:
            if not 0 < dim <= MAX_DIM:
                raise ValueError(f"vectors have 1 to {MAX_DIM} dimensions, not {dim}")
            table = set_table(job_id, model)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (table,))
                conn.execute(
                    f"INSERT INTO {SETS_TABLE} (job_id, model, table_name, dim) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (job_id, model) DO NOTHING",
                    (job_id, model, table, dim),
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} ("
                    "position integer PRIMARY KEY, source text NOT NULL, "
                    f"embedding vector({dim}) NOT NULL)"
                )
                row = conn.execute(
                    f"SELECT dim FROM {SETS_TABLE} WHERE job_id = %s AND model = %s",
                    (job_id, model),
                ).fetchone()
            vset = VectorSet(job_id, model, table, int(row[0]), None)
            self._sets[key] = vset
        if vset.dim != dim:
            raise ValueError(
                f"job {job_id} model {model} stores {vset.dim}-dimensional vectors, not {dim}"
            )
        return vset

    # writing
    def write_chunk(
        self,
        job_id: str,
        model: str,
        first: int,
        images: Sequence[str],
        vectors: Sequence[np.ndarray | None],
    ) -> int:
        """Store a chunk's vectors; ``first`` is the job position of its first image.

        ``vectors[i]`` None (the image failed) removes any vector stored at that
        position before, so a rewritten chunk leaves exactly its own outcome.
        Idempotent on (job, position, model). How many vectors were written.
        """
        if len(images) != len(vectors):
            raise ValueError("one vector (or None) per image")
        conn = self._conn()
        present = [(first + i, images[i], v) for i, v in enumerate(vectors) if v is not None]
        missing = [first + i for i, v in enumerate(vectors) if v is None]
        if present:
            dim = int(np.asarray(present[0][2]).size)
            vset = self._ensure_set(conn, job_id, model, dim)
        else:
            found = self._sets.get((job_id, model)) or self.get_set(job_id, model)
            if found is None:
                return 0
            vset = found
        rows = []
        for position, image, vector in present:
            vec = Vec(vector)
            if vec.array.size != vset.dim:
                raise ValueError(f"a {vec.array.size}-dimensional vector in a {vset.dim}-d set")
            rows.append((position, image, vec))
        with conn.transaction(), conn.cursor() as cur:
            if missing:
                cur.execute(f"DELETE FROM {vset.table} WHERE position = ANY(%s)", (missing,))
            if rows:
                cur.executemany(
                    f"INSERT INTO {vset.table} (position, source, embedding) VALUES (%s, %s, %s) "
                    "ON CONFLICT (position) DO UPDATE SET source = EXCLUDED.source, "
                    "embedding = EXCLUDED.embedding",
                    rows,
                )
        return len(rows)

    def write_records(self, job_id: str, model: str, first: int, records: Sequence[Any]) -> int:
        """Store the vectors of a chunk's result records (``shared.contract.ResultDict``:
        ``embedding`` when embedded, none when the image failed); see :meth:`write_chunk`."""
        vectors = [
            np.asarray(r["embedding"], dtype=np.float32) if r.get("embedding") is not None else None
            for r in records
        ]
        return self.write_chunk(job_id, model, first, [r["image"] for r in records], vectors)

    # reading
    def count(self, job_id: str, model: str) -> int:
        """Vectors stored for the job and model."""
        vset = self.get_set(job_id, model)
        if vset is None:
            return 0
        row = self._conn().execute(f"SELECT count(*) FROM {vset.table}").fetchone()
        return int(row[0]) if row else 0

    def iter_batches(
        self, job_id: str, model: str, *, batch: int = FETCH_ROWS
    ) -> Iterator[VectorBatch]:
        """The set's vectors in position order, ``batch`` rows per round trip
        (a server-side cursor on a connection of its own)."""
        vset = self.get_set(job_id, model)
        if vset is None:
            return
        conn = self.connect()
        try:
            with (
                conn.transaction(),
                conn.cursor(name=f"imgq_vec_read_{vset.table}", binary=True) as cur,
            ):
                cur.itersize = batch
                cur.execute(
                    f"SELECT position, source, embedding FROM {vset.table} ORDER BY position"
                )
                while rows := cur.fetchmany(batch):
                    matrix = np.empty((len(rows), vset.dim), dtype=np.float32)
                    for i, row in enumerate(rows):
                        matrix[i] = row[2]
                    yield VectorBatch(
                        positions=np.fromiter(
                            (r[0] for r in rows), dtype=np.int64, count=len(rows)
                        ),
                        images=[r[1] for r in rows],
                        matrix=matrix,
                    )
        finally:
            conn.close()

    def matrix(self, job_id: str, model: str) -> tuple[np.ndarray, list[str]]:
        """Every vector of the set as one N x D float32 matrix, and the images, in order."""
        vset = self.get_set(job_id, model)
        if vset is None:
            return np.zeros((0, 0), dtype=np.float32), []
        out = np.empty((self.count(job_id, model), vset.dim), dtype=np.float32)
        names: list[str] = []
        n = 0
        for part in self.iter_batches(job_id, model):
            m = len(part.images)
            if n + m > len(out):  # rows written while reading
                out = np.concatenate([out, np.empty((n + m - len(out), vset.dim), np.float32)])
            out[n : n + m] = part.matrix
            names.extend(part.images)
            n += m
        return out[:n], names

    def vector_of(self, job_id: str, model: str, image: str | int) -> tuple[int, np.ndarray]:
        """The stored vector of one image of the job: by position, or by the name as
        submitted (its first occurrence); KeyError when the job has none for it."""
        vset = self._require_set(job_id, model)
        conn = self._conn()
        with conn.cursor(binary=True) as cur:
            if isinstance(image, int):
                cur.execute(
                    f"SELECT position, embedding FROM {vset.table} WHERE position = %s", (image,)
                )
            else:
                cur.execute(
                    f"SELECT position, embedding FROM {vset.table} WHERE source = %s "
                    "ORDER BY position LIMIT 1",
                    (image,),
                )
            row = cur.fetchone()
        if row is None:
            raise KeyError(f"job {job_id} has no vector of {image!r} for model {model}")
        return int(row[0]), row[1]

    # the index
    def build_index(
        self, job_id: str, model: str, *, method: str | None = None, rebuild: bool = False
    ) -> VectorSet:
        """Build the set's HNSW index (once; ``rebuild`` replaces it, e.g. with another
        method); the set as indexed. Writes to this set wait while it builds."""
        vset = self._require_set(job_id, model)
        chosen = method or vset.method or default_method(vset.dim)
        if vset.indexed_at is not None and vset.method == chosen and not rebuild:
            return vset
        expr, ops, _op, _q = _index_sql(chosen, vset.dim)
        conn = self._conn()
        index = f"{vset.table}_ann"
        started = time.perf_counter()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (vset.table,))
            now = self.get_set(job_id, model)
            if now and now.indexed_at is not None and now.method == chosen and not rebuild:
                return now
            conn.execute(f"SET LOCAL maintenance_work_mem = '{BUILD_MEMORY}'")
            conn.execute(f"DROP INDEX IF EXISTS {index}")
            conn.execute(
                f"CREATE INDEX {index} ON {vset.table} USING hnsw ({expr} {ops}) "
                f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
            )
            conn.execute(f"ANALYZE {vset.table}")
            elapsed = time.perf_counter() - started
            conn.execute(
                f"UPDATE {SETS_TABLE} SET method = %s, indexed_at = now(), index_build_s = %s "
                "WHERE job_id = %s AND model = %s",
                (chosen, elapsed, job_id, model),
            )
        log.info("indexed job %s model %s (%s) in %.2f s", job_id, model, chosen, elapsed)
        return self._require_set(job_id, model)

    def _indexed(self, job_id: str, model: str) -> VectorSet:
        vset = self._require_set(job_id, model)
        if vset.indexed_at is None:
            vset = self.build_index(job_id, model)
        return vset

    # search
    def similar(
        self,
        job_id: str,
        model: str,
        query: np.ndarray,
        *,
        k: int = 10,
        exclude: int | None = None,
        candidates: int | None = None,
    ) -> list[Neighbor]:
        """The ``k`` images of the set nearest to ``query`` by cosine similarity, nearest
        first (exact similarities of the index's candidates); ``exclude``: a position
        left out (the query's own image)."""
        vset = self._indexed(job_id, model)
        q = Vec(query)
        if q.array.size != vset.dim:
            raise ValueError(f"a {q.array.size}-dimensional query for {vset.dim}-d vectors")
        wanted = k + (1 if exclude is not None else 0)
        cand = max(wanted, candidates or CANDIDATES.get(vset.method or "", 40))
        sql = (
            "SELECT position, source, 1 - (embedding <=> %(q)s) AS similarity FROM ("
            + _candidates_sql(vset, "%(q)s", "%(cand)s")
            + ") c ORDER BY embedding <=> %(q)s, position LIMIT %(wanted)s"
        )
        conn = self._conn()
        with conn.transaction():
            conn.execute(f"SET LOCAL hnsw.ef_search = {_ef_search(cand)}")
            rows = conn.execute(sql, {"q": q, "cand": cand, "wanted": wanted}).fetchall()
        out = [Neighbor(int(p), s, float(sim)) for p, s, sim in rows if p != exclude]
        return out[:k]

    def exact_similar(
        self, job_id: str, model: str, query: np.ndarray, *, k: int = 10
    ) -> list[Neighbor]:
        """The ``k`` nearest by an exact scan of every vector (no index): the reference."""
        vset = self._require_set(job_id, model)
        rows = (
            self._conn()
            .execute(
                f"SELECT position, source, 1 - (embedding <=> %(q)s) FROM {vset.table} "
                "ORDER BY embedding <=> %(q)s, position LIMIT %(k)s",
                {"q": Vec(query), "k": k},
            )
            .fetchall()
        )
        return [Neighbor(int(p), s, float(sim)) for p, s, sim in rows]

    def similar_to(
        self, job_id: str, model: str, image: str | int, *, k: int = 10
    ) -> list[Neighbor]:
        """The ``k`` images nearest to one of the job's own (by name or position), not itself."""
        position, vector = self.vector_of(job_id, model, image)
        return self.similar(job_id, model, vector, k=k, exclude=position)

    def duplicates(
        self, job_id: str, model: str, *, threshold: float = 0.95, k: int = 10
    ) -> list[DuplicateGroup]:
        """Groups of near-duplicate images: the connected components of the graph that
        links each image to those of its ``k`` nearest (by the index, re-ranked
        exactly) whose cosine similarity is at least ``threshold``. Largest groups
        first (then by first position); each group in position order; images
        without a neighbour within the threshold are in no group."""
        if not -1.0 <= threshold <= 1.0:
            raise ValueError("a cosine similarity threshold lies between -1 and 1")
        vset = self._indexed(job_id, model)
        cand = max(k + 1, CANDIDATES.get(vset.method or "", 40))
        inner = _candidates_sql(vset, "a.embedding", "%(cand)s", alias="b")
        sql = (
            "SELECT a.position, a.source, c.position, c.source, "
            "1 - (c.embedding <=> a.embedding) AS similarity "
            f"FROM {vset.table} a CROSS JOIN LATERAL ({inner}) c "
            "WHERE c.position <> a.position AND 1 - (c.embedding <=> a.embedding) >= %(thr)s"
        )
        conn = self._conn()
        with conn.transaction():
            conn.execute(f"SET LOCAL hnsw.ef_search = {_ef_search(cand)}")
            rows = conn.execute(sql, {"cand": cand, "thr": threshold}).fetchall()
        # Keep each image's k most similar links, then join the links' ends.
        links: dict[int, list[tuple[float, int]]] = {}
        names: dict[int, str] = {}
        for a, a_src, b, b_src, sim in rows:
            links.setdefault(a, []).append((float(sim), b))
            names[a], names[b] = a_src, b_src
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            parent.setdefault(x, x)
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, near in links.items():
            for _sim, b in sorted(near, key=lambda t: (-t[0], t[1]))[:k]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
        groups: dict[int, list[int]] = {}
        for x in parent:
            groups.setdefault(find(x), []).append(x)
        ordered = sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))
        return [DuplicateGroup(g, [names[p] for p in g]) for g in ordered]

    # storage and deletion
    def storage_bytes(self, job_id: str, model: str) -> dict[str, int]:
        """Bytes on disk of the set: ``table`` (with its TOAST, where the vectors
        live) and ``index`` (the HNSW index and the primary key)."""
        vset = self._require_set(job_id, model)
        row = (
            self._conn()
            .execute(
                "SELECT pg_table_size(%s::regclass), pg_indexes_size(%s::regclass)",
                (vset.table, vset.table),
            )
            .fetchone()
        )
        return {"table": int(row[0]), "index": int(row[1])}

    def delete_job(self, job_id: str) -> int:
        """Drop every vector set of the job; how many vectors went."""
        conn = self._conn()
        deleted = 0
        for vset in self.sets(job_id):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (vset.table,))
                row = conn.execute(f"SELECT count(*) FROM {vset.table}").fetchone()
                deleted += int(row[0]) if row else 0
                conn.execute(f"DROP TABLE IF EXISTS {vset.table}")
                conn.execute(
                    f"DELETE FROM {SETS_TABLE} WHERE job_id = %s AND model = %s",
                    (job_id, vset.model),
                )
            self._sets.pop((job_id, vset.model), None)
        return deleted


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def results_with_vectors_sql(results_table: str, sets: Sequence[VectorSet]) -> str:
    """A job's result rows (``%s``: the job id), in position and model order, with a
    last column: the vector of an embedding model's image as pgvector's text form
    (``[0.1,-2,...]``, which is JSON, each float32 written so that it reads back
    exactly), NULL for every other row.

    Columns: position, model, source, top5 (text), error_code, error_message, embedding.
    """
    joins = []
    columns = []
    for i, vset in enumerate(sets):
        joins.append(
            f"LEFT JOIN {vset.table} v{i} ON r.model = {_literal(vset.model)} "
            f"AND v{i}.position = r.position"
        )
        columns.append(f"v{i}.embedding::text")
    embedding = (
        (columns[0] if len(columns) == 1 else f"COALESCE({', '.join(columns)})")
        if columns
        else "NULL::text"
    )
    return (
        "SELECT r.position, r.model, r.source, r.top5::text, r.error_code, r.error_message, "
        f"{embedding} FROM {results_table} r {' '.join(joins)} "
        "WHERE r.job_id = %s ORDER BY r.position, r.model"
    )


def existing_sets(conn: Any, job_id: str) -> list[VectorSet]:
    """The job's vector sets, read on ``conn`` without creating anything: none when the
    database has no vector tables (a classifier-only store, perhaps without pgvector)."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (SETS_TABLE,)).fetchone()
    if not row or not row[0]:
        return []
    rows = conn.execute(
        f"SELECT model, table_name, dim, method, indexed_at, index_build_s "
        f"FROM {SETS_TABLE} WHERE job_id = %s ORDER BY model",
        (job_id,),
    ).fetchall()
    return [VectorSet(job_id, r[0], r[1], int(r[2]), r[3], r[4], r[5]) for r in rows]

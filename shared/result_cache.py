"""No image computed twice: a model's output for an image, kept in PostgreSQL under a
key of the image's bytes and everything that shapes the output.

The key is (:func:`model_identity`, SHA-256 of the image's bytes). The identity is a
digest of the model (its handle, and for a local SavedModel the contents of its
files), what the worker does around it (kind, input size, activation, labels and
their contents, top-k, precision, runtime, decode mode) and
:data:`CACHE_FORMAT`. Change any of them (a retrained model file, another
precision) and the images miss: nothing stale comes back.

A classifier's entry is its top-5 (JSON, as in the record); an embedding model's,
its vector (float32 bytes, exact). A job that meets a cached image reuses the entry
instead of decoding it and running the model; the bytes are still read, to hash
them. On by default with the PostgreSQL results store (``IMGQ_RESULT_CACHE``);
:meth:`ResultCache.purge` empties it, or one model's part of it.

The table lives beside the results table, versioned the same way (its own version
table, an advisory lock), and needs no extension.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.pg_schema import migrate, table_version

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TABLE = "imgq_result_cache"
VERSION_TABLE = "imgq_result_cache_schema"
# The advisory lock of this schema ("imgc").
_LOCK_KEY = 0x696D6763
# Part of every identity: bumping it invalidates every entry (a change of what is stored).
CACHE_FORMAT = 1

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""CREATE TABLE {TABLE} (
            identity     text        NOT NULL,
            image_sha256 bytea       NOT NULL,
            model        text        NOT NULL,
            top5         jsonb,
            embedding    bytea,
            created_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (identity, image_sha256)
        )""",
        # Purging one model's entries.
        f"CREATE INDEX {TABLE}_model ON {TABLE} (model)",
    ),
}


class CacheSchemaError(RuntimeError):
    """The cache table's schema is newer than this imgq knows."""


def image_digest(data: bytes) -> bytes:
    """The SHA-256 of an image's bytes (32 bytes)."""
    return hashlib.sha256(data).digest()


_FILES_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}
_FILES_LOCK = threading.Lock()


def files_digest(folder: str | Path) -> str:
    """SHA-256 over the relative paths and contents of every file under ``folder`` (a
    SavedModel directory), in path order. Remembered per process while no file's
    size or modification time changes."""
    root = Path(folder)
    entries: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            stat = path.stat()
            entries.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    key = (str(root.resolve()), tuple(entries))
    with _FILES_LOCK:
        known = _FILES_DIGESTS.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    for relative, size, _mtime in entries:
        digest.update(f"{relative}\0{size}\0".encode())
        with open(root / relative, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    value = digest.hexdigest()
    with _FILES_LOCK:
        _FILES_DIGESTS[key] = value
    return value


def model_identity(
    spec: Any,
    *,
    precision: str,
    runtime: str,
    decode: str,
    top_k: int,
    labels: Sequence[str] = (),
) -> str:
    """The cache identity of a loaded model (a ``shared.registry.ModelSpec``) as a
    worker runs it: a hex digest of the model's files (or its hub handle), the
    preprocessing and the runtime settings. Two names for one SavedModel share it."""
    handle = str(spec.handle)
    files = handle if "://" in handle else files_digest(handle)
    what = {
        "format": CACHE_FORMAT,
        "files": files,
        "kind": str(spec.kind),
        "input_size": list(spec.input_size),
        "activation": str(spec.activation),
        "labels": hashlib.sha256("\n".join(labels).encode()).hexdigest(),
        "top_k": top_k,
        "precision": precision,
        "runtime": runtime,
        "decode": decode,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CachedResult:
    """What a model gave for an image: its top-5 (classifier) or its vector."""

    top5: list[dict[str, Any]] | None = None
    embedding: np.ndarray | None = None


def current_version(conn: Any) -> int:
    """The cache schema's version in the database, 0 when there is no cache table."""
    return table_version(conn, VERSION_TABLE)


def ensure_schema(conn: Any) -> int:
    """Create or migrate the cache table in one transaction under an advisory lock; the
    version found before. ``conn`` is an autocommit psycopg connection."""

    def refuse(found: int) -> None:
        raise CacheSchemaError(
            f"the result cache is at schema version {found}, newer than the "
            f"{SCHEMA_VERSION} this imgq knows: upgrade imgq on this host"
        )

    return migrate(
        conn,
        version_table=VERSION_TABLE,
        lock_key=_LOCK_KEY,
        migrations=MIGRATIONS,
        target=SCHEMA_VERSION,
        refuse=refuse,
    )


class ResultCache:
    """The cache in PostgreSQL; one connection per thread."""

    def __init__(self, url: str, *, connect_timeout: int = 10) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._ready = False
        self._lock = threading.Lock()

    def _conn(self) -> Any:
        import psycopg

        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=self.connect_timeout,
                application_name="imgq-cache",
            )
            self._local.conn = conn
        if not self._ready:
            with self._lock:
                if not self._ready:
                    ensure_schema(conn)
                    self._ready = True
        return conn

    def check(self) -> None:
        """Connect and create or migrate the table."""
        self._conn()

    def get_many(self, identity: str, digests: Sequence[bytes]) -> dict[bytes, CachedResult]:
        """The cached entries of these image digests (those found)."""
        if not digests:
            return {}
        rows = (
            self._conn()
            .execute(
                f"SELECT image_sha256, top5::text, embedding FROM {TABLE} "
                "WHERE identity = %s AND image_sha256 = ANY(%s)",
                (identity, list(digests)),
            )
            .fetchall()
        )
        out: dict[bytes, CachedResult] = {}
        for digest, top5, embedding in rows:
            vector = None if embedding is None else np.frombuffer(bytes(embedding), "<f4").copy()
            out[bytes(digest)] = CachedResult(
                top5=None if top5 is None else json.loads(top5), embedding=vector
            )
        return out

    def put_many(self, identity: str, model: str, entries: Mapping[bytes, CachedResult]) -> None:
        """Store entries (an entry already there is kept: the same key, the same output)."""
        if not entries:
            return
        rows = [
            (
                identity,
                digest,
                model,
                None if e.top5 is None else json.dumps(e.top5),
                None if e.embedding is None else np.ascontiguousarray(e.embedding, "<f4").tobytes(),
            )
            for digest, e in entries.items()
        ]
        conn = self._conn()
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {TABLE} (identity, image_sha256, model, top5, embedding) "
                "VALUES (%s, %s, %s, %s::jsonb, %s) ON CONFLICT DO NOTHING",
                rows,
            )

    def count(self, model: str | None = None) -> int:
        """Entries in the cache (of one model name)."""
        if model is None:
            row = self._conn().execute(f"SELECT count(*) FROM {TABLE}").fetchone()
        else:
            row = (
                self._conn()
                .execute(f"SELECT count(*) FROM {TABLE} WHERE model = %s", (model,))
                .fetchone()
            )
        return int(row[0]) if row else 0

    def purge(self, model: str | None = None) -> int:
        """Delete every entry (or one model name's); how many went."""
        if model is None:
            cur = self._conn().execute(f"DELETE FROM {TABLE}")
        else:
            cur = self._conn().execute(f"DELETE FROM {TABLE} WHERE model = %s", (model,))
        return int(cur.rowcount)

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

"""The PostgreSQL results schema, versioned: created, migrated, or refused when newer.

The tables live in the first schema of the connection's ``search_path`` (``public``
unless the URL says otherwise, e.g. ``?options=-csearch_path%3Dimgq``).

- ``imgq_schema``   one row: the version of the tables below
- ``imgq_results``  one row per image and model (primary key: job, image position, model)

Each migration moves the schema one version up, in a transaction, under an advisory
lock, so that workers starting together apply it once. A process that meets a schema
newer than it knows refuses to write into it.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1
TABLE = "imgq_results"
VERSION_TABLE = "imgq_schema"
# Any constant shared by every imgq process: the key of the advisory lock.
_LOCK_KEY = 0x696D6771

# MIGRATIONS[v] takes the schema from version v - 1 to v.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""CREATE TABLE {TABLE} (
            job_id        text        NOT NULL,
            position      integer     NOT NULL,
            model         text        NOT NULL,
            source        text        NOT NULL,
            top1_index    integer,
            top1_label    text,
            top1_score    real,
            top5          jsonb       NOT NULL DEFAULT '[]'::jsonb,
            error_code    text,
            error_message text,
            created_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (job_id, position, model)
        )""",
        # Filter a job by model and top-1 class, best scores first.
        f"CREATE INDEX {TABLE}_job_model_top1 ON {TABLE} "
        "(job_id, model, top1_label, top1_score DESC)",
    ),
}


class SchemaError(RuntimeError):
    """The database holds a results schema this imgq cannot use."""


def current_version(conn: Any) -> int:
    """The schema version in the database, 0 when there are no imgq tables yet."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (VERSION_TABLE,)).fetchone()
    if not row or not row[0]:
        return 0
    version = conn.execute(f"SELECT max(version) FROM {VERSION_TABLE}").fetchone()
    return int(version[0] or 0) if version else 0


def check_version(version: int) -> None:
    """A SchemaError when ``version`` is newer than this imgq knows."""
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the results table is at schema version {version}, newer than the {SCHEMA_VERSION} "
            "this imgq knows: upgrade imgq on this host (it never writes into a newer schema)"
        )


def ensure_schema(conn: Any) -> int:
    """Create or migrate the results tables to :data:`SCHEMA_VERSION`; the version found.

    ``conn`` is a psycopg connection; the work is one transaction.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        found = current_version(conn)
        check_version(found)
        if found == 0:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version integer NOT NULL)")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"DELETE FROM {VERSION_TABLE}")
            conn.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (%s)", (version,))
    return found

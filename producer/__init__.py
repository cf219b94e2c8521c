"""imgq producers: the Python API and the ``imgq`` command line. No TensorFlow here."""

from producer.api import Client, Job
from producer.sources import SourceError, expand_sources

__all__ = ["Client", "Job", "SourceError", "expand_sources"]

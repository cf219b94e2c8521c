"""The worker process's runtime, set once when the worker starts."""

from __future__ import annotations

from workers.runtime import Runtime

_runtime: Runtime | None = None


def set_runtime(runtime: Runtime | None) -> None:
    """Install (or clear) this process's runtime."""
    global _runtime
    _runtime = runtime


def get_runtime() -> Runtime:
    """This process's runtime; a RuntimeError when the models were not loaded."""
    if _runtime is None:
        raise RuntimeError("no models loaded in this process: start it as an imgq worker")
    return _runtime

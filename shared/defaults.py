"""Defaults and bounds of settings, read from ``Settings`` itself, so that help texts
and command-line options never drift from what the settings do."""

from __future__ import annotations

from typing import Any

from shared.settings import Settings


def default_of(field: str) -> Any:
    """The default value of the setting ``field``."""
    return Settings.model_fields[field].get_default(call_default_factory=True)


def bounds_of(field: str) -> tuple[int | None, int | None]:
    """The inclusive ``ge``/``le`` bounds of the integer setting ``field`` (None: open)."""
    low = high = None
    for meta in Settings.model_fields[field].metadata:
        low = getattr(meta, "ge", low)
        high = getattr(meta, "le", high)
    return low, high

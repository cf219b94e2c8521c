"""What a worker may read and how much, from the IMGQ_* settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.settings import Settings


@dataclass(frozen=True)
class ReadLimits:
    """What a worker may read and how much: roots, byte/pixel caps, URL fetch policy."""

    allowed_roots: tuple[Path, ...]
    max_bytes: int
    max_pixels: int
    fetch_timeout: float
    max_redirects: int
    allow_private_urls: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> ReadLimits:
        """The limits configured by IMGQ_* settings."""
        return cls(
            allowed_roots=tuple(settings.allowed_roots),
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            fetch_timeout=settings.fetch_timeout,
            max_redirects=settings.fetch_max_redirects,
            allow_private_urls=settings.allow_private_urls,
        )

"""Thumbnails of local images for the reports; URLs are never fetched here."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["Thumbnailer", "make_thumbnail", "no_thumbnail", "thumbnails"]

Thumbnailer = Callable[[str], bytes | None]

_THUMB_WORKERS = 8


def _is_url(ref: str) -> bool:
    """True for anything with a scheme (http://, s3:// ...), which is never read here."""
    return "://" in ref


def _load_image(ref: str, max_side: int) -> Any:
    """Open a local image, EXIF-rotated, RGB on white, at most max_side pixels a side."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(ref) as opened:
            opened.draft("RGB", (max_side * 2, max_side * 2))
            img = ImageOps.exif_transpose(opened)
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGB", rgba.size, (255, 255, 255))
                background.paste(rgba, mask=rgba.getchannel("A"))
                return background
            return img.convert("RGB")


def make_thumbnail(path_or_url_ref: str, max_side: int = 160) -> bytes | None:
    """A JPEG thumbnail of a local image, or None for URLs and on any failure."""
    if not path_or_url_ref or _is_url(path_or_url_ref):
        return None
    try:
        img = _load_image(path_or_url_ref, max_side)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=78, optimize=True)
        return buf.getvalue()
    except Exception:
        return None


def no_thumbnail(path_or_url_ref: str) -> bytes | None:
    """A thumbnailer that never makes one (placeholders everywhere)."""
    return None


def thumbnails(srcs: Sequence[str], thumbnail: Thumbnailer) -> list[bytes | None]:
    """Thumbnails for every source, made in a few threads; failures become None."""

    def one(src: str) -> bytes | None:
        try:
            return thumbnail(src)
        except Exception:
            return None

    if thumbnail is no_thumbnail:
        return [None] * len(srcs)
    if len(srcs) < 4:
        return [one(s) for s in srcs]
    with ThreadPoolExecutor(max_workers=min(_THUMB_WORKERS, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, srcs))

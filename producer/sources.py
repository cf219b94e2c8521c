"""Turns what a user names (files, folders, globs, manifests, URLs) into image references.

Each reference keeps the source as the user gave it (``src``, shown in results) and
what a worker reads (``ref``: an absolute path, or the URL). Local paths are not
checked for existence here: a worker may see them on a shared volume, and one that
does not gets a ``not_found`` record, so every submitted image has an outcome.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared.schemas import ImageRef

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
MANIFEST_KEYS = ("image", "path", "url", "source", "src", "file")
_GLOB_CHARS = set("*?[")


class SourceError(ValueError):
    """A source cannot be expanded (an empty glob, an unreadable or malformed manifest)."""


def is_url(source: str) -> bool:
    """True for anything with a scheme (http, file, s3 ...); workers decide what they read."""
    return "://" in source


def _walk(src: str, directory: Path) -> Iterator[ImageRef]:
    """Image files under a directory, recursively, sorted by path (string operations:
    this runs once per file of folders with millions of them)."""
    base = os.path.abspath(directory)
    found: list[str] = []
    for root, dirs, files in os.walk(base, followlinks=False):
        dirs.sort()
        found.extend(
            os.path.join(root, f)
            for f in files
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    found.sort()
    prefix = src.rstrip("/")
    cut = len(base) + 1
    for path in found:
        yield ImageRef(src=f"{prefix}/{path[cut:]}", ref=path)


def _manifest_entries(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SourceError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(f"manifest {path} is not UTF-8 text") from exc
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if not rows:
            return
        header = [h.strip().lower() for h in rows[0]]
        column = next((header.index(k) for k in MANIFEST_KEYS if k in header), None)
        body = rows[1:] if column is not None else rows
        col = column or 0
        for n, row in enumerate(body, start=2 if column is not None else 1):
            if len(row) <= col:
                raise SourceError(f"{path}:{n}: row has no column {col + 1}")
            if row[col].strip():
                yield row[col].strip()
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{n}: not JSON: {exc.msg}") from exc
            if isinstance(item, str):
                yield item
            elif isinstance(item, dict):
                key = next((k for k in MANIFEST_KEYS if isinstance(item.get(k), str)), None)
                if key is None:
                    raise SourceError(f"{path}:{n}: no {' / '.join(MANIFEST_KEYS)} field")
                yield item[key]
            else:
                raise SourceError(f"{path}:{n}: expected a string or an object")
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _expand_one(source: str, base: str, *, in_manifest: bool) -> Iterator[ImageRef]:
    # String operations, not pathlib: a manifest can name millions of files.
    if is_url(source):
        yield ImageRef(src=source, ref=source)
        return
    if source.startswith("@") and not in_manifest:
        yield from _expand_manifest(Path(base, os.path.expanduser(source[1:])))
        return
    expanded = os.path.expanduser(source)
    full = os.path.abspath(os.path.join(base, expanded))  # an absolute source stays itself
    if any(c in source for c in _GLOB_CHARS) and not os.path.exists(full):
        matches = sorted(glob.glob(full, recursive=True))
        if not matches:
            raise SourceError(f"no file matches {source!r}")
        for match in matches:
            rel = match if os.path.isabs(expanded) else os.path.relpath(match, base)
            if os.path.isdir(match):
                yield from _walk(rel, Path(match))
            elif os.path.splitext(match)[1].lower() in IMAGE_EXTENSIONS:
                yield ImageRef(src=rel, ref=os.path.abspath(match))
        return
    suffix = os.path.splitext(full)[1].lower()
    # A name with an image extension is an image: no stat per file of a long list
    # (a folder named like an image still gets its is_directory record).
    if not in_manifest and suffix not in IMAGE_EXTENSIONS:
        if os.path.isdir(full):
            yield from _walk(source, Path(full))
            return
        if suffix in {".csv", ".jsonl"} and os.path.isfile(full):
            yield from _expand_manifest(Path(full))
            return
    yield ImageRef(src=source, ref=full)


def _expand_manifest(manifest: Path) -> Iterator[ImageRef]:
    base = str(manifest.parent)
    for entry in _manifest_entries(manifest):
        yield from _expand_one(entry, base, in_manifest=True)


def expand_sources(sources: Iterable[str], *, cwd: Path | None = None) -> list[ImageRef]:
    """Image references for every source, in the order given (folders sorted, recursive).

    - ``http(s)://...``: a URL, fetched by the worker;
    - a folder: its image files (by extension), recursively;
    - a glob (``photos/**/*.jpg``): the matching image files;
    - ``@list.txt``: a manifest, one source per line (``#`` comments);
      ``.csv`` (column image/path/url/source, or the first) and ``.jsonl``
      (strings, or objects with one of those keys) are manifests too;
    - anything else: one image path, relative to the manifest's folder inside a manifest.

    Entries in a manifest that name a folder are passed on as they are (the worker
    answers ``is_directory``), so a manifest's length is its number of images.
    """
    base = str((cwd or Path.cwd()).resolve())
    out: list[ImageRef] = []
    for source in sources:
        out.extend(_expand_one(source, base, in_manifest=False))
    return out

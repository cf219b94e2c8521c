"""Turns what a user names (files, folders, globs, manifests, URLs) into image references.

Each reference keeps the source as the user gave it (``src``, shown in results) and
what a worker reads (``ref``: an absolute path, or the URL). Image paths are not
checked for existence here: a worker may see them on a shared volume, and one that
does not gets a ``not_found`` record, so every submitted image has an outcome. The
command line checks the sources a user typed (``missing_sources``) before it submits.
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from shared.image_formats import IMAGE_EXTENSIONS
from shared.s3 import is_s3_url
from shared.schemas import ImageRef

MANIFEST_KEYS = ("image", "path", "url", "source", "src", "file")
# Text files that are lists of sources when named with @ (a hint when named without).
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
CSV_DELIMITERS = ",;\t|"
_GLOB_CHARS = set("*?[")


class SourceError(ValueError):
    """A source cannot be expanded (an empty glob, an unreadable or malformed manifest)."""


def is_url(source: str) -> bool:
    """True for anything with a scheme (http, file, s3 ...); workers decide what they read."""
    return "://" in source


def _walk(src: str, directory: Path) -> Iterator[ImageRef]:
    """Image files under a directory, recursively, in the order of their sorted paths,
    one folder in memory at a time (string operations: this runs once per file of
    folders with millions of them). A folder that cannot be read (gone, no permission)
    is a SourceError, not a part of the tree silently left out."""
    base = os.path.abspath(directory)
    prefix = src.rstrip("/")
    cut = len(base) + 1
    for path in _walk_sorted(base):
        yield ImageRef(src=f"{prefix}/{path[cut:]}", ref=path)


def _walk_sorted(folder: str) -> Iterator[str]:
    # A folder sorts as its name plus "/", so that the files come out in the order
    # of their full paths sorted ("a.jpg" < "a/x.jpg" < "a0.jpg"). Links to folders
    # are not followed.
    try:
        with os.scandir(folder) as it:
            entries = [(e.name + "/", e.path) if _is_folder(e) else (e.name, e.path) for e in it]
    except OSError as exc:
        raise SourceError(f"cannot read folder {folder}: {exc.strerror or exc}") from exc
    entries.sort()
    for name, path in entries:
        if name.endswith("/"):
            if not os.path.islink(path):
                yield from _walk_sorted(path)
        elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            yield path


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _manifest_entries(path: Path) -> Iterator[str]:
    """The sources a manifest lists, read line by line (a manifest of ten million
    lines is never in memory at once)."""
    try:
        stream = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115
    except OSError as exc:
        raise SourceError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
    try:
        with stream:
            yield from _entries_of(path, stream)
    except OSError as exc:
        raise SourceError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(f"manifest {path} is not UTF-8 text") from exc


def _entries_of(path: Path, stream: TextIO) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _csv_entries(path, stream)
    elif suffix == ".jsonl":
        for n, line in enumerate(stream, start=1):
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
        for line in stream:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _csv_entries(path: Path, stream: TextIO) -> Iterator[str]:
    """The sources of a CSV manifest: the column named image, path, url, source, src or
    file (any delimiter of ``CSV_DELIMITERS``, sniffed on its first 50 lines), or the
    only column of a file without a header; blank lines skipped. A file with neither
    is refused."""
    head = list(itertools.islice(stream, 50))
    lines = itertools.chain(head, stream)
    sample = "".join(line for line in head if line.strip())
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
            sample, delimiters=CSV_DELIMITERS
        )
    except csv.Error:  # one column (nothing to sniff), or no consistent delimiter
        dialect = csv.excel
    rows = ((n, row) for n, row in enumerate(csv.reader(lines, dialect), start=1))
    rows = ((n, row) for n, row in rows if any(cell.strip() for cell in row))
    first = next(rows, None)
    if first is None:
        return
    header = [h.strip().lower() for h in first[1]]
    column = next((header.index(k) for k in MANIFEST_KEYS if k in header), None)
    if column is None:
        only = first[1][0].strip() if len(first[1]) == 1 else ""
        if not (only and _looks_like_a_source(only)):
            raise SourceError(
                f"{path}: no column named {', '.join(MANIFEST_KEYS)} in the header "
                f"({', '.join(first[1])[:200]})"
            )
        column = 0
        yield only
    for n, row in rows:
        if len(row) <= column:
            raise SourceError(f"{path}:{n}: row has no column {column + 1}")
        if row[column].strip():
            yield row[column].strip()


def _looks_like_a_source(cell: str) -> bool:
    """True for a URL, a path with an image extension or a folder separator: the first
    line of a one-column CSV without a header."""
    return is_url(cell) or "/" in cell or os.path.splitext(cell)[1].lower() in IMAGE_EXTENSIONS


def missing_sources(sources: Iterable[str], *, cwd: Path | None = None) -> list[str]:
    """The sources a user typed that name a local path that does not exist (a
    mistyped folder or file); URLs, globs and manifests are checked when expanded."""
    base = str((cwd or Path.cwd()).resolve())
    missing = []
    for source in sources:
        if is_url(source) or source.startswith("@") or any(c in source for c in _GLOB_CHARS):
            continue
        if not os.path.exists(os.path.join(base, os.path.expanduser(source))):
            missing.append(source)
    return missing


def _expand_one(source: str, base: str, *, in_manifest: bool) -> Iterator[ImageRef]:
    # String operations, not pathlib: a manifest can name millions of files.
    if is_s3_url(source):  # listed page by page, on the command line and in a manifest
        from producer.s3_sources import expand_s3

        yield from expand_s3(source)
        return
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
    # (a folder named like an image still gets its is_directory record). Other names
    # are looked at: a folder is walked, on the command line and in a manifest alike.
    if suffix not in IMAGE_EXTENSIONS:
        if os.path.isdir(full):
            yield from _walk(source, Path(full))
            return
        if not in_manifest and suffix in {".csv", ".jsonl"} and os.path.isfile(full):
            yield from _expand_manifest(Path(full))
            return
        if not in_manifest and suffix in LIST_SUFFIXES and os.path.isfile(full):
            raise SourceError(
                f"{source!r} is a text file, not an image: to submit the sources it lists "
                f"(one a line), name it @{source}"
            )
    yield ImageRef(src=source, ref=full)


def _expand_manifest(manifest: Path) -> Iterator[ImageRef]:
    base = str(manifest.parent)
    for entry in _manifest_entries(manifest):
        if _is_plain_image_path(entry):  # most lines of a long manifest: no more to do
            yield ImageRef(src=entry, ref=entry)
        else:
            yield from _expand_one(entry, base, in_manifest=True)


def _is_plain_image_path(entry: str) -> bool:
    """True for an absolute, normalised path with an image extension and no glob
    characters: what ``_expand_one`` would take as it is, without looking at it."""
    return (
        entry.startswith("/")
        and os.path.splitext(entry)[1].lower() in IMAGE_EXTENSIONS
        and "/." not in entry
        and "//" not in entry
        and not any(c in entry for c in _GLOB_CHARS)
    )


def iter_sources(
    sources: Iterable[str | ImageRef], *, cwd: Path | None = None
) -> Iterator[ImageRef]:
    """Image references for every source, in the order given (folders sorted,
    recursive), as they are found: manifests are read line by line and folders one
    folder at a time, so memory does not grow with the number of images (a glob's
    matches are sorted, so held, one glob at a time). ``ImageRef`` items are taken as
    they are; ``sources`` may be a generator of any length.

    - ``http(s)://...``: a URL, fetched by the worker;
    - ``s3://bucket/prefix/`` (its image objects, recursively), ``s3://bucket/**/*.jpg``
      (a glob) or ``s3://bucket/key``: objects, read by the worker
      (``producer.s3_sources``);
    - a folder: its image files (by extension), recursively;
    - a glob (``photos/**/*.jpg``): the matching image files;
    - ``@list.txt``: a manifest, one source per line (``#`` comments);
      ``.csv`` (a column named image/path/url/source/src/file, any of the delimiters
      ``, ; tab |``, or one column without a header) and ``.jsonl`` (strings, or
      objects with one of those keys) are manifests too; a ``.txt`` file named
      without ``@`` is refused with that hint;
    - anything else: one image path.

    Inside a manifest, relative paths are relative to the manifest's folder, and a
    line names a file, a folder (walked) or a glob (expanded), as on the command line.
    A source that cannot be expanded is a SourceError when the iteration reaches it.
    """
    base = str((cwd or Path.cwd()).resolve())
    for source in sources:
        if isinstance(source, ImageRef):
            yield source
        else:
            yield from _expand_one(source, base, in_manifest=False)


def expand_sources(sources: Iterable[str], *, cwd: Path | None = None) -> list[ImageRef]:
    """Every image reference of ``sources`` in a list (see :func:`iter_sources`, which
    yields them one at a time)."""
    return list(iter_sources(sources, cwd=cwd))


def iter_manifest_entry(entry: str, base: str) -> Iterator[ImageRef]:
    """The images of one manifest line read by another reader (``imgq train``'s
    labelled manifests): a file, folder, glob or URL, relative paths against ``base``
    (the manifest's folder), exactly as a line of a manifest given to ``submit``."""
    return _expand_one(entry, base, in_manifest=True)

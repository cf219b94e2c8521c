"""The HTML report: one self-contained file rendered from a Jinja2 template.

The template, stylesheet and script are package data, inlined at render time, with
the Content-Security-Policy hashes of the inlined style and script. The per-image
data sits in an embedded JSON block with thumbnails inside it, and the script
renders it a page at a time, so 10,000 images stay usable.

The records are read once, as a stream: images are grouped within a bounded window
and handled a batch at a time (thumbnails, then one JSON row each, appended to a
spool file next to the report), while the summary accumulates. The template is then
rendered with a placeholder where the images go, and the page is written as its
head, the spooled rows and its tail, so memory does not grow with the job.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.report.compare import (
    DEFAULT_WINDOW,
    ReportImage,
    SummaryBuilder,
    activation_caption,
    image_agreement,
    iter_images,
)
from producer.report.thumbnails import Thumbnailer, make_thumbnail, thumbnails
from shared.schemas import ResultRecord

if TYPE_CHECKING:
    import jinja2

__all__ = ["DEFAULT_TITLE", "ReportStats", "write_html_report"]

DEFAULT_TITLE = "imgq model comparison"
_TEMPLATE = "report.html.j2"
_BATCH = 256  # images whose thumbnails and rows are made together
_COPY_BYTES = 1 << 20


@dataclass(frozen=True)
class ReportStats:
    """What write_html_report wrote: images in the summary, shown in the gallery, pages."""

    path: Path
    size_bytes: int
    images: int
    pages: int
    shown: int


# The near-duplicates section lists this many groups, and this many names of each.
MAX_GROUPS_SHOWN = 200
MAX_GROUP_NAMES_SHOWN = 12


@dataclass(frozen=True)
class DuplicatesSection:
    """Near-duplicate groups of one embedding model (images as submitted), largest first."""

    model: str
    threshold: float
    groups: Sequence[Sequence[str]]


def static_text(name: str) -> str:
    """A stylesheet or script shipped in the package, without its final newline."""
    return (resources.files("producer.report") / "static" / name).read_text("utf-8").strip()


def csp_hash(text: str) -> str:
    """A CSP source expression for one inline script or style element."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def _count(n: int) -> str:
    """A count with thousands separators."""
    return f"{n:,}"


def _pct(value: float | None) -> str:
    """A fraction as a percentage, or an en dash."""
    from markupsafe import Markup

    return Markup("&ndash;") if value is None else f"{value * 100:.1f}%"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """The template environment: autoescaped, undefined names an error."""
    try:
        import jinja2
    except ImportError as exc:
        raise ImportError(
            "the HTML report needs Jinja2: pip install 'imgq[report]'", name=exc.name
        ) from exc
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("producer.report", "templates"),
        # Every value is escaped unless a Python caller marks it safe; the
        # template's name ends in .j2, so select_autoescape would not apply.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["count"] = _count
    env.filters["pct"] = _pct
    return env


def _json_for_script(value: Any) -> str:
    """JSON safe inside a <script> element: no "</", "<!--", "&" or line separators."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _image_payload(
    models: Sequence[str],
    image: ReportImage,
    thumb: bytes | None,
    label_ids: dict[str, int],
    label_sets: Mapping[str, str] | None,
) -> list[Any]:
    """One image as compact JSON: [src, thumb base64, results per model, top-1 agreement]."""
    agree, matched = image_agreement(models, image, label_sets)
    results: list[Any] = []
    for m in models:
        record = image.records.get(m)
        if record is None:
            results.append(None)
        elif record.error is not None:
            results.append({"c": str(record.error.code), "m": record.error.message})
        else:
            preds = []
            for pos, p in enumerate(record.top5):
                lid = label_ids.setdefault(p.label, len(label_ids))
                score = float(p.score) if math.isfinite(p.score) else 0.0
                preds.append([lid, p.index, round(score, 5), 1 if pos in matched[m] else 0])
            results.append(preds)
    return [image.src, base64.b64encode(thumb).decode("ascii") if thumb else "", results, agree]


def _tracking_jobs(
    records: Iterable[ResultRecord], jobs: dict[str, None]
) -> Iterator[ResultRecord]:
    """The records unchanged, noting each job id in first-seen order on the way."""
    for record in records:
        jobs.setdefault(record.job_id, None)
        yield record


def write_html_report(
    records: Iterable[ResultRecord],
    out: Path,
    *,
    activations: Mapping[str, str],
    thumbnail: Thumbnailer | None = None,
    page_size: int = 100,
    title: str = DEFAULT_TITLE,
    label_sets: Mapping[str, str] | None = None,
    models: Sequence[str] | None = None,
    window: int = DEFAULT_WINDOW,
    max_images: int | None = None,
    duplicates: Sequence[DuplicatesSection] = (),
) -> ReportStats:
    """Write one self-contained HTML comparison report; thumbnail None means make_thumbnail.

    ``models``: the columns, in order (a job's models). Given, the records are read
    once as a stream and grouped within ``window`` images (the job's chunk size
    groups every image; see :func:`~producer.report.compare.iter_images`), so
    memory stays bounded however many there are; records of other models are left
    out. None: the records are held in memory to learn the models, in first-seen
    order.

    ``max_images``: the gallery shows the first this many images (None: all); the
    summary still counts every image, and the page says how many are shown.

    ``duplicates``: a near-duplicates section per embedding model (its groups, largest
    first; the page lists the first :data:`MAX_GROUPS_SHOWN`).
    """
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    if max_images is not None and max_images < 1:
        raise ValueError("max_images must be at least 1")
    from markupsafe import Markup

    env = _environment()
    grouping: int | None = window
    if models is None:
        records = list(records)
        models = list(dict.fromkeys(r.model for r in records))
        grouping = None
    models = list(models)
    captions = {m: activation_caption(activations.get(m)) for m in models}
    make = thumbnail or make_thumbnail
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    jobs: dict[str, None] = {}
    builder = SummaryBuilder(models, label_sets=label_sets)
    label_ids: dict[str, int] = {}
    shown = 0
    spool = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, removed in finally)
        mode="wb", dir=out.parent, prefix=f".{out.name}.", suffix=".rows", delete=False
    )
    try:
        with spool:
            images = iter_images(_tracking_jobs(records, jobs), window=grouping)
            while batch := list(islice(images, _BATCH)):
                for image in batch:
                    builder.add(image)
                if max_images is not None:
                    batch = batch[: max(0, max_images - shown)]
                if not batch:
                    continue
                thumbs = thumbnails([im.src for im in batch], make)
                for image, thumb in zip(batch, thumbs, strict=True):
                    row = _json_for_script(
                        _image_payload(models, image, thumb, label_ids, label_sets)
                    )
                    spool.write((b"," if shown else b"") + row.encode("utf-8"))
                    shown += 1
        summary = builder.result()
        cards = [
            ("Images", _count(summary.images)),
            ("Models", _count(len(summary.models))),
            ("Failed results", _count(sum(summary.failures.values()))),
        ]
        if jobs:
            cards.append(("Job" if len(jobs) == 1 else "Jobs", ", ".join(jobs)))
        css, script = static_text("report.css"), static_text("report.js")
        csp = (
            "default-src 'none'; img-src data:; "
            f"style-src {csp_hash(css)}; script-src {csp_hash(script)}; "
            "base-uri 'none'; form-action 'none'"
        )
        # The payload with an empty images array, then a placeholder put in it: the
        # rows are spooled, and go where the placeholder is when the page is written.
        empty = _json_for_script(
            {
                "models": [{"name": m, "caption": captions[m]} for m in models],
                "labels": list(label_ids),
                "pageSize": page_size,
                "images": [],
            }
        )
        assert empty.endswith("[]}")
        while True:
            token = f"imgq-images-{uuid.uuid4().hex}"
            page = env.get_template(_TEMPLATE).render(
                title=title,
                n_images=summary.images,
                shown=shown,
                cards=cards,
                summary=summary,
                captions=captions,
                duplicates=[
                    {
                        "model": d.model,
                        "threshold": d.threshold,
                        "n_groups": len(d.groups),
                        "n_images": sum(len(g) for g in d.groups),
                        "groups": [
                            (g[:MAX_GROUP_NAMES_SHOWN], len(g) - MAX_GROUP_NAMES_SHOWN)
                            for g in d.groups[:MAX_GROUPS_SHOWN]
                        ],
                    }
                    for d in duplicates
                ],
                # Marked safe, so placed verbatim: the CSP is built here from constants
                # and base64 hashes, the CSS and script are package files, and the
                # payload is JSON made safe for a <script> element above (HTML escaping
                # would break it); the placeholder is ASCII letters, digits and dashes.
                csp=Markup(csp),
                css=Markup(css),
                script=Markup(script),
                payload=Markup(empty[:-2] + token + "]}"),
            )
            if page.count(token) == 1:
                break
        head, _token, tail = page.partition(token)
        with open(tmp, "wb") as dest:
            dest.write(head.encode("utf-8"))
            with open(spool.name, "rb") as rows:
                shutil.copyfileobj(rows, dest, _COPY_BYTES)
            dest.write(tail.encode("utf-8"))
            size = dest.tell()
        tmp.replace(out)
    finally:
        Path(spool.name).unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return ReportStats(
        path=out,
        size_bytes=size,
        images=summary.images,
        pages=max(1, math.ceil(shown / page_size)),
        shown=shown,
    )

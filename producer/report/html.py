"""The HTML report: one self-contained file rendered from a Jinja2 template.

The template, stylesheet and script are package data, inlined at render time, with
the Content-Security-Policy hashes of the inlined style and script. The per-image
data sits in an embedded JSON block with thumbnails inside it, and the script
renders it a page at a time, so 10,000 images stay usable.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.report.compare import (
    ReportImage,
    activation_caption,
    compare,
    group_records,
    image_agreement,
)
from producer.report.thumbnails import Thumbnailer, make_thumbnail, thumbnails
from shared.schemas import ResultRecord

if TYPE_CHECKING:
    import jinja2

__all__ = ["DEFAULT_TITLE", "ReportStats", "write_html_report"]

DEFAULT_TITLE = "imgq model comparison"
_TEMPLATE = "report.html.j2"


@dataclass(frozen=True)
class ReportStats:
    """What write_html_report wrote."""

    path: Path
    size_bytes: int
    images: int
    pages: int


def _static(name: str) -> str:
    """A stylesheet or script shipped in the package, without its final newline."""
    return (resources.files("producer.report") / "static" / name).read_text("utf-8").strip()


def _csp_hash(text: str) -> str:
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


def write_html_report(
    records: Iterable[ResultRecord],
    out: Path,
    *,
    activations: Mapping[str, str],
    thumbnail: Thumbnailer | None = None,
    page_size: int = 100,
    title: str = DEFAULT_TITLE,
    label_sets: Mapping[str, str] | None = None,
) -> ReportStats:
    """Write one self-contained HTML comparison report; thumbnail None means make_thumbnail."""
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    from markupsafe import Markup

    env = _environment()
    records = list(records)
    models, images = group_records(records)
    summary = compare(models, images, label_sets=label_sets)
    captions = {m: activation_caption(activations.get(m)) for m in models}
    jobs = list(dict.fromkeys(r.job_id for r in records))
    thumbs = thumbnails([im.src for im in images], thumbnail or make_thumbnail)
    label_ids: dict[str, int] = {}
    rows = [
        _image_payload(models, image, thumb, label_ids, label_sets)
        for image, thumb in zip(images, thumbs, strict=True)
    ]
    payload = _json_for_script(
        {
            "models": [{"name": m, "caption": captions[m]} for m in models],
            "labels": list(label_ids),
            "pageSize": page_size,
            "images": rows,
        }
    )
    cards = [
        ("Images", _count(summary.images)),
        ("Models", _count(len(summary.models))),
        ("Failed results", _count(sum(summary.failures.values()))),
    ]
    if jobs:
        cards.append(("Job" if len(jobs) == 1 else "Jobs", ", ".join(jobs)))
    css, script = _static("report.css"), _static("report.js")
    csp = (
        "default-src 'none'; img-src data:; "
        f"style-src {_csp_hash(css)}; script-src {_csp_hash(script)}; "
        "base-uri 'none'; form-action 'none'"
    )
    page = env.get_template(_TEMPLATE).render(
        title=title,
        n_images=len(images),
        cards=cards,
        summary=summary,
        captions=captions,
        # Marked safe, so placed verbatim: the CSP is built here from constants and
        # base64 hashes, the CSS and script are package files, and the payload is
        # JSON made safe for a <script> element above (HTML escaping would break it).
        csp=Markup(csp),
        css=Markup(css),
        script=Markup(script),
        payload=Markup(payload),
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = page.encode("utf-8")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return ReportStats(
        path=out,
        size_bytes=len(data),
        images=len(images),
        pages=max(1, math.ceil(len(images) / page_size)),
    )

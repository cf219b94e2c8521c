"""Model comparison reports: each image's top-5 per model side by side, and where models agree.

Two outputs from the same result records:

* :func:`write_html_report`: one self-contained HTML file (no external URLs). The
  per-image data sits in an embedded JSON block with thumbnails inside it, and a
  small inline script renders it a page at a time, so 10,000 images stay usable.
* :func:`write_png_reports`: one PNG per image (matplotlib, Agg, no pyplot).

Models with different label sets (ImageNet-1k vs ImageNet-21k) are compared by the
label's first lemma, case-insensitive, falling back to any shared lemma; models
with the same label set are compared by class index.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import textwrap
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.labels import first_lemma
from shared.registry import ModelSpec
from shared.schemas import Prediction, ResultRecord

__all__ = [
    "MatchMethod",
    "ModelStats",
    "PairStats",
    "ReportImage",
    "ReportStats",
    "Summary",
    "activation_caption",
    "compare",
    "group_records",
    "make_thumbnail",
    "match_method",
    "match_top5",
    "model_info",
    "no_thumbnail",
    "png_name",
    "write_html_report",
    "write_png_reports",
]

Thumbnailer = Callable[[str], bytes | None]

DEFAULT_TITLE = "imgq model comparison"
_THUMB_WORKERS = 8
_PNG_IMAGE_SIDE = 320


# --------------------------------------------------------------------------- grouping


@dataclass
class ReportImage:
    """One image: its source as the user gave it and each model's record."""

    src: str
    records: dict[str, ResultRecord] = field(default_factory=dict)


def group_records(records: Iterable[ResultRecord]) -> tuple[list[str], list[ReportImage]]:
    """Models and images in first-seen order; a later record for the same pair wins."""
    models: dict[str, None] = {}
    images: dict[str, ReportImage] = {}
    for record in records:
        models.setdefault(record.model, None)
        image = images.get(record.image)
        if image is None:
            image = images[record.image] = ReportImage(src=record.image)
        image.records[record.model] = record
    return list(models), list(images.values())


# --------------------------------------------------------------------------- matching


class MatchMethod(StrEnum):
    """How two classes of two models were found to be the same."""

    INDEX = "index"  # same label set, same class index
    FIRST_LEMMA = "first lemma"  # the labels' first lemmas are equal (case-insensitive)
    ANY_LEMMA = "any lemma"  # the labels share some lemma


_METHOD_RANK = {MatchMethod.INDEX: 0, MatchMethod.FIRST_LEMMA: 1, MatchMethod.ANY_LEMMA: 2}


@lru_cache(maxsize=65536)
def _lemmas(label: str) -> frozenset[str]:
    """A label's lemmas ("lemma1, lemma2, ..."), stripped and lower-cased."""
    return frozenset(part.strip().lower() for part in label.split(",") if part.strip())


@lru_cache(maxsize=65536)
def _first(label: str) -> str:
    """The label's first lemma (cached)."""
    return first_lemma(label)


def match_method(
    a: Prediction, b: Prediction, *, same_label_set: bool | None
) -> MatchMethod | None:
    """How classes a and b match, or None; same_label_set None means unknown."""
    if same_label_set:
        return MatchMethod.INDEX if a.index == b.index else None
    if (
        same_label_set is None
        and a.index == b.index
        and a.label.strip().lower() == b.label.strip().lower()
    ):
        return MatchMethod.INDEX
    first_a = _first(a.label)
    if first_a and first_a == _first(b.label):
        return MatchMethod.FIRST_LEMMA
    if _lemmas(a.label) & _lemmas(b.label):
        return MatchMethod.ANY_LEMMA
    return None


def match_top5(
    a: Sequence[Prediction], b: Sequence[Prediction], *, same_label_set: bool | None
) -> list[tuple[int, int, MatchMethod]]:
    """One-to-one matches (position in a, position in b, method), strongest methods first."""
    candidates: list[tuple[int, int, int, int, int, MatchMethod]] = []
    for i, pa in enumerate(a):
        for j, pb in enumerate(b):
            method = match_method(pa, pb, same_label_set=same_label_set)
            if method is not None:
                exact = 0 if pa.label.strip().lower() == pb.label.strip().lower() else 1
                candidates.append((_METHOD_RANK[method], exact, i + j, i, j, method))
    candidates.sort(key=lambda c: c[:5])
    used_a: set[int] = set()
    used_b: set[int] = set()
    matches: list[tuple[int, int, MatchMethod]] = []
    for _rank, _exact, _sum, i, j, method in candidates:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matches.append((i, j, method))
    matches.sort()
    return matches


def _same_set(label_sets: Mapping[str, str] | None, a: str, b: str) -> bool | None:
    """Whether two models share a label set; None when either is unknown."""
    if label_sets is None or a not in label_sets or b not in label_sets:
        return None
    return label_sets[a] == label_sets[b]


# --------------------------------------------------------------------------- summary


@dataclass
class ModelStats:
    """One model's outcome over the report's images."""

    model: str
    ok: int = 0
    failed: int = 0
    missing: int = 0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class PairStats:
    """Agreement of two models over the images both classified."""

    model_a: str
    model_b: str
    compared: int
    top1_agree: int
    top1_agreement: float | None
    mean_top5_overlap: float | None
    same_label_set: bool | None
    methods: dict[str, int] = field(default_factory=dict)


@dataclass
class Summary:
    """Images, models, failures per model and pairwise agreement."""

    images: int
    models: list[str]
    failures: dict[str, int]
    per_model: dict[str, ModelStats]
    pairs: list[PairStats]


def _overlap(n_matched: int, a: Sequence[Prediction], b: Sequence[Prediction]) -> float:
    """Matched classes over the top-k size (5 for every model with at least 5 classes)."""
    k = max(len(a), len(b))
    return n_matched / k if k else 0.0


def compare(
    models: Sequence[str],
    images: Sequence[ReportImage],
    *,
    label_sets: Mapping[str, str] | None = None,
) -> Summary:
    """Failures per model and, per pair of models, top-1 agreement and mean top-5 overlap."""
    per_model = {m: ModelStats(model=m) for m in models}
    for image in images:
        for m in models:
            record = image.records.get(m)
            stats = per_model[m]
            if record is None:
                stats.missing += 1
            elif record.error is not None:
                stats.failed += 1
                code = str(record.error.code)
                stats.errors[code] = stats.errors.get(code, 0) + 1
            else:
                stats.ok += 1
    pairs: list[PairStats] = []
    for ia, a in enumerate(models):
        for b in models[ia + 1 :]:
            same = _same_set(label_sets, a, b)
            compared = agree = 0
            overlap_sum = 0.0
            methods: Counter[str] = Counter()
            for image in images:
                ra, rb = image.records.get(a), image.records.get(b)
                if ra is None or rb is None or not ra.ok or not rb.ok or not ra.top5 or not rb.top5:
                    continue
                compared += 1
                if match_method(ra.top5[0], rb.top5[0], same_label_set=same) is not None:
                    agree += 1
                matches = match_top5(ra.top5, rb.top5, same_label_set=same)
                overlap_sum += _overlap(len(matches), ra.top5, rb.top5)
                methods.update(str(method) for _i, _j, method in matches)
            pairs.append(
                PairStats(
                    model_a=a,
                    model_b=b,
                    compared=compared,
                    top1_agree=agree,
                    top1_agreement=agree / compared if compared else None,
                    mean_top5_overlap=overlap_sum / compared if compared else None,
                    same_label_set=same,
                    methods={str(m): methods[str(m)] for m in MatchMethod if methods[str(m)]},
                )
            )
    return Summary(
        images=len(images),
        models=list(models),
        failures={m: per_model[m].failed for m in models},
        per_model=per_model,
        pairs=pairs,
    )


# --------------------------------------------------------------------------- model info


_CAPTIONS = {
    "softmax": "softmax probability",
    "sigmoid": "sigmoid, multi-label",
    "none": "model's own probability",
}


def activation_caption(activation: str | None) -> str:
    """What a model's scores are, for a column header ("softmax probability")."""
    if not activation:
        return "score"
    return _CAPTIONS.get(str(activation), str(activation))


def model_info(registry: Mapping[str, ModelSpec]) -> tuple[dict[str, str], dict[str, str]]:
    """The activations and label-set keys of a registry's models, for the report writers."""
    activations: dict[str, str] = {}
    label_sets: dict[str, str] = {}
    for name, spec in registry.items():
        activations[name] = str(spec.activation.value)
        if spec.labels_base_dir is not None:
            label_sets[name] = str((spec.labels_base_dir / spec.labels).resolve())
        else:
            label_sets[name] = spec.labels
    return activations, label_sets


# --------------------------------------------------------------------------- thumbnails


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


def _thumbnails(srcs: Sequence[str], thumbnail: Thumbnailer) -> list[bytes | None]:
    """Thumbnails for every source, made in a few threads; failures become None."""

    def one(src: str) -> bytes | None:
        try:
            return thumbnail(src)
        except Exception:
            return None

    if len(srcs) < 4:
        return [one(s) for s in srcs]
    with ThreadPoolExecutor(max_workers=min(_THUMB_WORKERS, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, srcs))


# --------------------------------------------------------------------------- HTML


@dataclass(frozen=True)
class ReportStats:
    """What write_html_report wrote."""

    path: Path
    size_bytes: int
    images: int
    pages: int


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
    matched: dict[str, set[int]] = {m: set() for m in models}
    ok = [m for m in models if (r := image.records.get(m)) is not None and r.ok and r.top5]
    agree: bool | None = None
    if len(ok) >= 2:
        agree = True
        for ia, a in enumerate(ok):
            for b in ok[ia + 1 :]:
                ta, tb = image.records[a].top5, image.records[b].top5
                same = _same_set(label_sets, a, b)
                if match_method(ta[0], tb[0], same_label_set=same) is None:
                    agree = False
                for i, j, _method in match_top5(ta, tb, same_label_set=same):
                    matched[a].add(i)
                    matched[b].add(j)
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


def _pct(value: float | None) -> str:
    """A fraction as a percentage, or an en dash."""
    return "&ndash;" if value is None else f"{value * 100:.1f}%"


def _summary_html(summary: Summary, captions: Mapping[str, str], jobs: Sequence[str]) -> str:
    """The summary section: counts, failures per model, pairwise agreement (escaped)."""
    e = html.escape
    total_failed = sum(summary.failures.values())
    cards = [
        ("Images", f"{summary.images:,}"),
        ("Models", f"{len(summary.models):,}"),
        ("Failed results", f"{total_failed:,}"),
    ]
    if jobs:
        cards.append(("Job" if len(jobs) == 1 else "Jobs", ", ".join(jobs)))
    out = ['<section class="summary" aria-label="Summary"><div class="cards">']
    for name, value in cards:
        out.append(
            f'<div class="card"><div class="card-k">{e(name)}</div>'
            f'<div class="card-v">{e(value)}</div></div>'
        )
    out.append("</div>")
    out.append('<div class="tables"><div class="tbl"><h2>Models</h2><table><thead><tr>')
    out.append(
        "<th>Model</th><th>Scores</th><th class=num>Classified</th>"
        "<th class=num>Failed</th><th class=num>Missing</th><th>Errors</th></tr></thead><tbody>"
    )
    for m in summary.models:
        st = summary.per_model[m]
        errors = ", ".join(f"{e(code)} &times; {n:,}" for code, n in sorted(st.errors.items()))
        out.append(
            f"<tr><td class=mono>{e(m)}</td><td>{e(captions[m])}</td>"
            f"<td class=num>{st.ok:,}</td>"
            f'<td class="num{" bad" if st.failed else ""}">{st.failed:,}</td>'
            f"<td class=num>{st.missing:,}</td><td class=mono>{errors or '&ndash;'}</td></tr>"
        )
    out.append("</tbody></table></div>")
    if summary.pairs:
        out.append('<div class="tbl"><h2>Agreement between models</h2><table><thead><tr>')
        out.append(
            "<th>Models</th><th class=num>Images compared</th><th class=num>Top-1 agreement</th>"
            "<th class=num>Mean top-5 overlap</th><th>Classes matched by</th></tr></thead><tbody>"
        )
        for p in summary.pairs:
            methods = ", ".join(f"{e(k)} &times; {v:,}" for k, v in p.methods.items()) or "&ndash;"
            agree = _pct(p.top1_agreement)
            if p.compared:
                agree += f' <span class="dim">({p.top1_agree:,}/{p.compared:,})</span>'
            out.append(
                f'<tr><td class="mono nowrap">{e(p.model_a)} &harr; {e(p.model_b)}</td>'
                f"<td class=num>{p.compared:,}</td><td class=num>{agree}</td>"
                f"<td class=num>{_pct(p.mean_top5_overlap)}</td><td>{methods}</td></tr>"
            )
        out.append("</tbody></table>")
        out.append(
            '<p class="note">Top-1 agreement: share of images both models classified whose '
            "top-1 classes match. Top-5 overlap: matched classes / 5. Models with the same "
            "label set are matched by class index; otherwise by the label's first lemma "
            "(case-insensitive), falling back to any shared lemma.</p></div>"
        )
    out.append("</div></section>")
    return "".join(out)


_CSS = """
:root{--fg:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa;--card:#fff;
--accent:#2f6fde;--accent-soft:#9db8e8;--bad:#c62828;--bad-bg:#fdecea;--ok:#2e7d32;--ok-bg:#e8f5e9;
--warn:#9a6700;--warn-bg:#fff4d6;--cols:180px}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,
sans-serif;color:var(--fg);background:var(--bg)}
header.top{padding:20px 28px 4px}
h1{font-size:21px;margin:0 0 2px;font-weight:650;letter-spacing:-.01em}
.sub{color:var(--muted);margin:0}
.summary{padding:12px 28px 4px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:14px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 16px;
min-width:130px}
.card-k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card-v{font-size:20px;font-weight:600;word-break:break-all}
.tables{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
.tbl{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;
flex:1 1 480px;overflow-x:auto}
.tbl h2{font-size:14px;margin:2px 0 8px;font-weight:600}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 10px 5px 0;border-bottom:1px solid var(--line);
vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600}
tr:last-child td{border-bottom:0}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.bad{color:var(--bad);font-weight:600}
.dim{color:var(--muted);font-weight:400}
.nowrap{white-space:nowrap}
.note{color:var(--muted);font-size:12px;margin:8px 0 2px}
.toolbar{position:sticky;top:0;z-index:5;background:var(--bg);
border-bottom:1px solid var(--line);padding:10px 28px;display:flex;gap:14px;align-items:center;
flex-wrap:wrap}
.toolbar input[type=search]{width:260px;padding:6px 10px;border:1px solid #cbd2d9;
border-radius:6px;font:inherit;background:#fff}
.toolbar label{display:flex;gap:6px;align-items:center;color:var(--fg);user-select:none}
.toolbar select,.toolbar input[type=number]{padding:5px 6px;border:1px solid #cbd2d9;
border-radius:6px;font:inherit;background:#fff}
.toolbar input[type=number]{width:70px}
.pager{display:flex;gap:8px;align-items:center;margin-left:auto}
button{font:inherit;padding:5px 12px;border:1px solid #cbd2d9;border-radius:6px;background:#fff;
cursor:pointer;color:var(--fg)}
button:hover:not(:disabled){border-color:var(--accent);color:var(--accent)}
button:disabled{opacity:.45;cursor:default}
.count{color:var(--muted);white-space:nowrap}
.legend{display:flex;gap:18px;color:var(--muted);font-size:12px;align-items:center;
margin:0 0 8px 2px}
.sw{display:inline-block;width:18px;height:8px;border-radius:2px;margin-right:5px;
vertical-align:middle}
.sw.m{background:var(--accent)}.sw.u{background:var(--accent-soft)}
main{padding:6px 28px 28px}
.grid{display:grid;grid-template-columns:var(--cols);gap:0;background:var(--card);
border:1px solid var(--line);border-radius:8px}
.hd:first-child{border-top-left-radius:8px}
.hd.last{border-top-right-radius:8px}
.hd{position:sticky;top:var(--tb,53px);z-index:4;background:#fbfcfd;padding:9px 14px;
border-bottom:1px solid var(--line);font-size:12px;color:var(--muted);font-weight:600}
.hd .mname{color:var(--fg);font-size:13.5px;font-family:ui-monospace,SFMono-Regular,Menlo,
Consolas,monospace}
.cell{padding:14px;border-bottom:1px solid var(--line);min-width:0}
.cell.model{border-left:1px solid var(--line)}
.row-last{border-bottom:0}
.thumb{width:160px;height:160px;object-fit:contain;background:#eef1f4;border-radius:6px;
display:block}
.ph{display:flex;align-items:center;justify-content:center;color:#9aa5b1;font-size:12px;
text-align:center;padding:8px}
.name{margin-top:6px;font-size:12px;word-break:break-all;color:var(--fg);
font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;display:-webkit-box;
-webkit-line-clamp:3;-webkit-box-orient:vertical;overflow:hidden}
.badge{display:inline-block;margin-top:6px;font-size:11px;padding:1px 7px;border-radius:10px;
font-weight:600}
.badge.agree{background:var(--ok-bg);color:var(--ok)}
.badge.differ{background:var(--warn-bg);color:var(--warn)}
.badge.fail{background:var(--bad-bg);color:var(--bad)}
.pred{margin-bottom:7px}
.pred:last-child{margin-bottom:0}
.pl{display:flex;justify-content:space-between;gap:10px;font-size:13px}
.lbl{overflow:hidden;text-overflow:ellipsis;white-space:nowrap;min-width:0}
.pred.top .lbl{font-weight:600}
.pct{font-variant-numeric:tabular-nums;color:var(--muted);white-space:nowrap}
.track{height:8px;background:#edf0f3;border-radius:4px;overflow:hidden;margin-top:2px}
.fill{height:100%;background:var(--accent-soft);border-radius:4px;min-width:1px}
.pred.m .fill{background:var(--accent)}
.err{background:var(--bad-bg);border-radius:6px;padding:10px 12px;color:var(--bad)}
.err .code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-weight:600;
font-size:12.5px}
.err .msg{margin:4px 0 0;color:#7f1d1d;font-size:12.5px;word-break:break-word}
.missing{color:var(--muted);font-style:italic}
.empty{padding:40px;text-align:center;color:var(--muted);grid-column:1/-1}
.foot{display:flex;justify-content:center;gap:8px;align-items:center;padding:16px 0 0}
noscript{display:block;padding:20px 28px;color:var(--bad)}
""".strip()

_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("imgq-data").textContent);
  var models = data.models, labels = data.labels, images = data.images;
  var nm = models.length;
  var state = {page: 0, size: data.pageSize, q: "", failOnly: false, differOnly: false};
  var filtered = null, search = null;
  var $ = function (id) { return document.getElementById(id); };
  var grid = $("grid"), qBox = $("q"), failBox = $("fail"), differBox = $("differ");
  var sizeSel = $("size"), pageBox = $("page"), countEl = $("count");
  var prevs = [$("prev"), $("prev2")], nexts = [$("next"), $("next2")];

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function pct(s) {
    if (s > 0 && s < 0.0005) { return "<0.1%"; }
    return (s * 100).toFixed(1) + "%";
  }
  function failed(img) {
    for (var i = 0; i < nm; i++) {
      var r = img[2][i];
      if (r === null || !Array.isArray(r)) { return true; }
    }
    return false;
  }
  function searchText(i) {
    if (search === null) { search = new Array(images.length); }
    if (search[i] === undefined) {
      var img = images[i], parts = [img[0]];
      for (var m = 0; m < nm; m++) {
        var r = img[2][m];
        if (Array.isArray(r)) {
          for (var k = 0; k < r.length; k++) { parts.push(labels[r[k][0]]); }
        } else if (r) { parts.push(r.c); }
      }
      search[i] = parts.join("\n").toLowerCase();
    }
    return search[i];
  }
  function refilter() {
    var q = state.q.trim().toLowerCase();
    var out = [];
    for (var i = 0; i < images.length; i++) {
      var img = images[i];
      if (state.failOnly && !failed(img)) { continue; }
      if (state.differOnly && img[3] !== false) { continue; }
      if (q && searchText(i).indexOf(q) < 0) { continue; }
      out.push(i);
    }
    filtered = out;
  }
  function pages() { return Math.max(1, Math.ceil(filtered.length / state.size)); }

  function header() {
    var frag = document.createDocumentFragment();
    frag.appendChild(el("div", "hd", "Image"));
    for (var m = 0; m < nm; m++) {
      var h = el("div", m === nm - 1 ? "hd last" : "hd");
      h.appendChild(el("span", "mname", models[m].name));
      h.appendChild(document.createTextNode(" (" + models[m].caption + ")"));
      frag.appendChild(h);
    }
    return frag;
  }
  function imageCell(img) {
    var c = el("div", "cell img");
    if (img[1]) {
      var t = el("img", "thumb");
      t.alt = img[0];
      t.src = "data:image/jpeg;base64," + img[1];
      c.appendChild(t);
    } else {
      c.appendChild(el("div", "thumb ph", "no preview"));
    }
    var n = el("div", "name", img[0]);
    n.title = img[0];
    c.appendChild(n);
    if (img[3] === true) { c.appendChild(el("span", "badge agree", "top-1 agrees")); }
    else if (img[3] === false) { c.appendChild(el("span", "badge differ", "top-1 differs")); }
    if (failed(img)) {
      c.appendChild(document.createTextNode(" "));
      c.appendChild(el("span", "badge fail", "failed"));
    }
    return c;
  }
  function modelCell(r) {
    var c = el("div", "cell model");
    if (r === null) {
      c.appendChild(el("div", "missing", "no result"));
    } else if (!Array.isArray(r)) {
      var e = el("div", "err");
      e.appendChild(el("div", "code", r.c));
      e.appendChild(el("p", "msg", r.m));
      c.appendChild(e);
    } else {
      for (var k = 0; k < r.length; k++) {
        var p = r[k], label = labels[p[0]];
        var d = el("div", "pred" + (k === 0 ? " top" : "") + (p[3] ? " m" : ""));
        var line = el("div", "pl");
        var l = el("span", "lbl", label);
        l.title = label + " (class " + p[1] + ")";
        line.appendChild(l);
        line.appendChild(el("span", "pct", pct(p[2])));
        d.appendChild(line);
        var track = el("div", "track"), fill = el("div", "fill");
        fill.style.width = Math.max(0, Math.min(100, p[2] * 100)).toFixed(2) + "%";
        track.appendChild(fill);
        d.appendChild(track);
        c.appendChild(d);
      }
    }
    return c;
  }
  function render() {
    if (filtered === null) { refilter(); }
    var np = pages();
    if (state.page >= np) { state.page = np - 1; }
    if (state.page < 0) { state.page = 0; }
    var start = state.page * state.size;
    var slice = filtered.slice(start, start + state.size);
    grid.textContent = "";
    grid.appendChild(header());
    var frag = document.createDocumentFragment();
    for (var s = 0; s < slice.length; s++) {
      var img = images[slice[s]];
      var cells = [imageCell(img)];
      for (var m = 0; m < nm; m++) { cells.push(modelCell(img[2][m])); }
      for (var x = 0; x < cells.length; x++) {
        if (s === slice.length - 1) { cells[x].className += " row-last"; }
        frag.appendChild(cells[x]);
      }
    }
    if (!slice.length) { frag.appendChild(el("div", "empty", "No images match.")); }
    grid.appendChild(frag);
    pageBox.value = String(state.page + 1);
    pageBox.max = String(np);
    var info = "page " + (state.page + 1) + " of " + np;
    $("pages").textContent = "of " + np;
    $("pages2").textContent = "Page " + (state.page + 1) + " of " + np;
    countEl.textContent = filtered.length === images.length
      ? images.length.toLocaleString("en-US") + " images"
      : filtered.length.toLocaleString("en-US") + " of " +
        images.length.toLocaleString("en-US") + " images";
    for (var i = 0; i < 2; i++) {
      prevs[i].disabled = state.page === 0;
      nexts[i].disabled = state.page >= np - 1;
    }
    document.body.setAttribute("data-page", info);
    toolbarHeight();
  }
  function go(p) { state.page = p; render(); }
  function refresh() { filtered = null; state.page = 0; render(); }

  var timer = null;
  qBox.addEventListener("input", function () {
    if (timer !== null) { clearTimeout(timer); }
    timer = setTimeout(function () { timer = null; state.q = qBox.value; refresh(); }, 150);
  });
  failBox.addEventListener("change", function () { state.failOnly = failBox.checked; refresh(); });
  differBox.addEventListener("change", function () {
    state.differOnly = differBox.checked; refresh();
  });
  sizeSel.addEventListener("change", function () {
    var first = state.page * state.size;
    state.size = parseInt(sizeSel.value, 10) || data.pageSize;
    go(Math.floor(first / state.size));
  });
  pageBox.addEventListener("change", function () {
    var p = parseInt(pageBox.value, 10);
    go(isNaN(p) ? state.page : p - 1);
  });
  function step(d) {
    var before = state.page;
    go(state.page + d);
    if (state.page !== before) { window.scrollTo(0, grid.offsetTop - 60); }
  }
  prevs.forEach(function (b) { b.addEventListener("click", function () { step(-1); }); });
  nexts.forEach(function (b) { b.addEventListener("click", function () { step(1); }); });
  document.addEventListener("keydown", function (ev) {
    var t = ev.target && ev.target.tagName;
    if (t === "INPUT" || t === "SELECT" || t === "TEXTAREA") { return; }
    if (ev.altKey || ev.ctrlKey || ev.metaKey) { return; }
    if (ev.key === "ArrowRight") { go(state.page + 1); }
    else if (ev.key === "ArrowLeft") { go(state.page - 1); }
  });
  var sizes = [25, 50, 100, 250, 500];
  if (sizes.indexOf(state.size) < 0) {
    sizes.push(state.size);
    sizes.sort(function (a, b) { return a - b; });
  }
  sizes.forEach(function (n) {
    var o = el("option", null, n + " per page");
    o.value = String(n);
    if (n === state.size) { o.selected = true; }
    sizeSel.appendChild(o);
  });
  var cols = "180px";
  for (var m = 0; m < nm; m++) { cols += " minmax(240px, 1fr)"; }
  grid.style.setProperty("--cols", cols);
  function toolbarHeight() {
    document.documentElement.style.setProperty("--tb", $("toolbar").offsetHeight + "px");
  }
  window.addEventListener("resize", toolbarHeight);
  toolbarHeight();
  render();
  document.body.setAttribute("data-ready", "1");
})();
""".strip()


def _csp_hash(text: str) -> str:
    """A CSP source expression for one inline script or style element."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def _html_page(title: str, summary_html: str, payload: str, n_images: int) -> str:
    """The whole page; the data block and script are placed verbatim."""
    e = html.escape
    csp = (
        "default-src 'none'; img-src data:; "
        f"style-src {_csp_hash(_CSS)}; script-src {_csp_hash(_JS)}; "
        "base-uri 'none'; form-action 'none'"
    )
    noun = "image" if n_images == 1 else "images"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{e(csp, quote=False)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{e(title)}</title>\n"
        f"<style>{_CSS}</style>\n"
        "</head><body>\n"
        f'<header class="top"><h1>{e(title)}</h1>'
        f'<p class="sub">Top-5 classes per model for {n_images:,} {noun}.</p></header>\n'
        f"{summary_html}\n"
        '<div class="toolbar" id="toolbar" role="toolbar" aria-label="Filter and pages">'
        '<input type="search" id="q" placeholder="Filter by image name or label"'
        ' aria-label="Filter by image name or label">'
        '<label><input type="checkbox" id="fail"> failures only</label>'
        '<label><input type="checkbox" id="differ"> top-1 disagreements only</label>'
        '<div class="pager"><span class="count" id="count"></span>'
        '<select id="size" aria-label="Images per page"></select>'
        '<button type="button" id="prev" aria-label="Previous page">&lsaquo; Prev</button>'
        '<span>Page <input type="number" id="page" min="1" value="1" aria-label="Page number">'
        ' <span id="pages"></span></span>'
        '<button type="button" id="next" aria-label="Next page">Next &rsaquo;</button>'
        "</div></div>\n"
        "<main><noscript>This report needs JavaScript to show the images.</noscript>"
        '<div class="legend"><span><span class="sw m"></span>class also in another model\'s'
        ' top-5</span><span><span class="sw u"></span>only in this model\'s top-5</span></div>'
        '<div class="grid" id="grid"></div>'
        '<div class="foot"><button type="button" id="prev2">&lsaquo; Prev</button>'
        '<span class="count" id="pages2"></span>'
        '<button type="button" id="next2">Next &rsaquo;</button></div></main>\n'
        f'<script type="application/json" id="imgq-data">{payload}</script>\n'
        f"<script>{_JS}</script>\n"
        "</body></html>\n"
    )


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
    records = list(records)
    models, images = group_records(records)
    summary = compare(models, images, label_sets=label_sets)
    captions = {m: activation_caption(activations.get(m)) for m in models}
    jobs = list(dict.fromkeys(r.job_id for r in records))
    thumbs = _thumbnails([im.src for im in images], thumbnail or make_thumbnail)
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
    page = _html_page(title, _summary_html(summary, captions, jobs), payload, len(images))
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


# --------------------------------------------------------------------------- PNG


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def png_name(index: int, src: str, width: int = 5) -> str:
    """A safe, unique PNG file name for the index-th image: "00007_cat.jpg.png"."""
    tail = src.rstrip("/\\").replace("\\", "/").split("?", 1)[0].split("#", 1)[0]
    base = tail.rsplit("/", 1)[-1] or "image"
    safe = _UNSAFE.sub("_", base).strip("._") or "image"
    return f"{index:0{width}d}_{safe[:80]}.png"


def _short(text: str, limit: int) -> str:
    """Text cut to limit characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _png_figure(
    image: ReportImage,
    models: Sequence[str],
    captions: Mapping[str, str],
    picture: Any,
) -> Any:
    """One image's figure: the picture, then a top-5 bar chart per model."""
    from matplotlib.figure import Figure

    n = len(models)
    fig = Figure(figsize=(3.0 + 4.4 * n, 3.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, n + 1, width_ratios=[0.7] + [1.0] * n, squeeze=False)[0]
    ax0 = axes[0]
    if picture is not None:
        ax0.imshow(picture)
    else:
        ax0.text(
            0.5, 0.5, "no preview", ha="center", va="center", color="#9aa5b1", parse_math=False
        )
    ax0.set_axis_off()
    name = "\n".join(textwrap.wrap(_short(image.src, 90), 32)) or image.src
    ax0.set_title(name, fontsize=8.5, loc="center", parse_math=False)
    for ax, model in zip(axes[1:], models, strict=True):
        ax.set_title(f"{model}\n({captions[model]})", fontsize=10, parse_math=False)
        record = image.records.get(model)
        if record is None or record.error is not None or not record.top5:
            ax.set_axis_off()
            if record is None:
                text, color = "no result", "#616e7c"
            elif record.error is not None:
                msg = "\n".join(textwrap.wrap(_short(record.error.message, 240), 46))
                text, color = f"failed: {record.error.code}\n\n{msg}", "#c62828"
            else:
                text, color = "no classes", "#616e7c"
            ax.text(
                0.5,
                0.5,
                text,
                ha="center",
                va="center",
                fontsize=9,
                color=color,
                wrap=True,
                parse_math=False,
                transform=ax.transAxes,
            )
            continue
        preds = record.top5
        scores = [
            max(0.0, min(1.0, float(p.score))) if math.isfinite(p.score) else 0.0 for p in preds
        ]
        ys = list(range(len(preds)))
        colors = ["#2f6fde" if i == 0 else "#8fb0ea" for i in ys]
        ax.barh(ys, scores, color=colors, height=0.62)
        ax.set_yticks(ys)
        ax.set_yticklabels([_short(p.label, 30) for p in preds], fontsize=8.5, parse_math=False)
        ax.invert_yaxis()
        ax.set_xlim(0.0, 1.0)
        ax.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0])
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("score (0\u20131)", fontsize=8.5)
        for y, s in zip(ys, scores, strict=True):
            inside = s > 0.8
            ax.text(
                s - 0.01 if inside else s + 0.01,
                y,
                f"{s:.3f}",
                va="center",
                ha="right" if inside else "left",
                fontsize=8,
                color="white" if inside else "#1f2933",
                parse_math=False,
            )
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        ax.grid(axis="x", color="#e4e7eb", linewidth=0.8)
        ax.set_axisbelow(True)
    return fig


def write_png_reports(
    records: Iterable[ResultRecord],
    out_dir: Path,
    *,
    activations: Mapping[str, str],
    thumbnail: Thumbnailer | None = None,
) -> list[Path]:
    """Write one PNG per image (picture and each model's top-5 bars); their paths in order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    models, images = group_records(records)
    captions = {m: activation_caption(activations.get(m)) for m in models}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load = thumbnail or (lambda ref: make_thumbnail(ref, _PNG_IMAGE_SIDE))
    width = max(5, len(str(len(images))))
    paths: list[Path] = []
    for index, image in enumerate(images, start=1):
        picture = None
        try:
            raw = load(image.src)
            if raw:
                with Image.open(io.BytesIO(raw)) as opened:
                    picture = opened.convert("RGB")
                    picture.load()
        except Exception:
            picture = None
        fig = _png_figure(image, models, captions, picture)
        FigureCanvasAgg(fig)
        path = out_dir / png_name(index, image.src, width)
        fig.savefig(path, format="png", facecolor="white")
        fig.clear()
        paths.append(path)
    return paths

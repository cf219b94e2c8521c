"""The PNG report: one chart per image, its picture and each model's top-5 bars
(matplotlib, Agg, no pyplot), drawn one figure at a time from the streamed records."""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from producer.report.compare import (
    DEFAULT_WINDOW,
    ReportImage,
    activation_caption,
    group_records,
    iter_images,
)
from producer.report.thumbnails import Thumbnailer, make_thumbnail
from shared.schemas import ResultRecord

__all__ = ["png_name", "write_png_reports"]

_PNG_IMAGE_SIDE = 320

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
    models: Sequence[str] | None = None,
    total: int | None = None,
    window: int = DEFAULT_WINDOW,
) -> list[Path]:
    """Write one PNG per image (picture and each model's top-5 bars); their paths in order.

    ``models`` (the charts, in order) and ``total`` (images expected, which sets the
    width of the numbers in the file names) both given: the records are read once
    as a stream, grouped within ``window`` images (see
    :func:`~producer.report.compare.iter_images`). Either missing: the records are
    held in memory to learn it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    images: Iterable[ReportImage]
    if models is None or total is None:
        seen_models, grouped = group_records(records)
        models = seen_models if models is None else models
        total = len(grouped) if total is None else total
        images = grouped
    else:
        images = iter_images(records, window=window)
    models = list(models)
    captions = {m: activation_caption(activations.get(m)) for m in models}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load = thumbnail or (lambda ref: make_thumbnail(ref, _PNG_IMAGE_SIDE))
    width = max(5, len(str(total)))
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

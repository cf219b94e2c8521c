"""Model comparison reports: each image's top-5 per model side by side, and where models agree.

Two outputs from the same result records, both built on the comparison maths in
:mod:`producer.report.compare` (grouping, class matching, agreement), and both able
to read the records as a stream, in memory that does not grow with the job:

* :func:`write_html_report` (:mod:`producer.report.html`): one self-contained HTML
  file (no external URLs) from a Jinja2 template, with its stylesheet and script
  inlined from package data.
* :func:`write_png_reports` (:mod:`producer.report.png`): one PNG per image
  (matplotlib, Agg, no pyplot).
"""

from __future__ import annotations

from producer.report.compare import (
    DEFAULT_WINDOW,
    MatchMethod,
    ModelStats,
    PairStats,
    ReportImage,
    Summary,
    SummaryBuilder,
    activation_caption,
    compare,
    group_records,
    iter_images,
    match_method,
    match_top5,
    model_info,
)
from producer.report.html import DEFAULT_TITLE, DuplicatesSection, ReportStats, write_html_report
from producer.report.png import png_name, write_png_reports
from producer.report.thumbnails import Thumbnailer, make_thumbnail, no_thumbnail

__all__ = [
    "DEFAULT_TITLE",
    "DEFAULT_WINDOW",
    "DuplicatesSection",
    "MatchMethod",
    "ModelStats",
    "PairStats",
    "ReportImage",
    "ReportStats",
    "Summary",
    "SummaryBuilder",
    "Thumbnailer",
    "activation_caption",
    "compare",
    "group_records",
    "iter_images",
    "make_thumbnail",
    "match_method",
    "match_top5",
    "model_info",
    "no_thumbnail",
    "png_name",
    "write_html_report",
    "write_png_reports",
]

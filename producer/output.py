"""Writes result records as JSONL (one record per line) or CSV (top-5 flattened)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import Literal, TextIO

from shared.schemas import ResultRecord

Format = Literal["jsonl", "csv"]
TOP_K = 5


def csv_header() -> list[str]:
    """CSV columns: the record's identity, its error, then index/label/score per rank."""
    cols = ["job_id", "image", "model", "error_code", "error_message"]
    for rank in range(1, TOP_K + 1):
        cols += [f"top{rank}_index", f"top{rank}_label", f"top{rank}_score"]
    return cols


def csv_row(record: ResultRecord) -> list[str]:
    """One CSV row for one record (empty cells where a rank or the error is absent)."""
    row = [
        record.job_id,
        record.image,
        record.model,
        record.error.code.value if record.error else "",
        record.error.message if record.error else "",
    ]
    for rank in range(TOP_K):
        if rank < len(record.top5):
            p = record.top5[rank]
            row += [str(p.index), p.label, repr(p.score)]
        else:
            row += ["", "", ""]
    return row


def write_records(records: Iterable[ResultRecord], out: TextIO, fmt: Format) -> int:
    """Write every record to ``out``; how many were written."""
    count = 0
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record.to_json_dict(), ensure_ascii=False) + "\n")
            count += 1
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(csv_header())
        for record in records:
            writer.writerow(csv_row(record))
            count += 1
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return count

"""Writes result records as JSONL (one record per line), CSV (top-5 flattened) or
Parquet (top-5 as a list of structs; pyarrow, the ``parquet`` extra)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TextIO

from shared.schemas import ResultRecord

Format = Literal["jsonl", "csv", "parquet"]
TOP_K = 5
# Records per Parquet row group: what the writer holds in memory at once.
PARQUET_ROWS = 16384


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
        raise ValueError(f"format {fmt!r} is not a text format")
    return count


def parquet_schema() -> Any:
    """The Parquet columns: identity, error, and the top 5 as a list of structs."""
    import pyarrow as pa

    prediction = pa.struct([("index", pa.int32()), ("label", pa.string()), ("score", pa.float64())])
    return pa.schema(
        [
            ("job_id", pa.string()),
            ("image", pa.string()),
            ("model", pa.string()),
            ("top5", pa.list_(prediction)),
            ("error_code", pa.string()),
            ("error_message", pa.string()),
        ]
    )


def write_parquet(records: Iterable[ResultRecord], path: str | Path) -> int:
    """Write every record to a Parquet file, ``PARQUET_ROWS`` at a time; how many."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("--format parquet needs pyarrow: pip install 'imgq[parquet]'") from None
    schema = parquet_schema()
    count = 0
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        cols: dict[str, list[object]] = {name: [] for name in schema.names}

        def flush() -> None:
            writer.write_table(pa.Table.from_pydict(cols, schema=schema))
            for values in cols.values():
                values.clear()

        for record in records:
            cols["job_id"].append(record.job_id)
            cols["image"].append(record.image)
            cols["model"].append(record.model)
            cols["top5"].append(
                [{"index": p.index, "label": p.label, "score": p.score} for p in record.top5]
            )
            cols["error_code"].append(record.error.code.value if record.error else None)
            cols["error_message"].append(record.error.message if record.error else None)
            count += 1
            if count % PARQUET_ROWS == 0:
                flush()
        if count % PARQUET_ROWS or count == 0:
            flush()
    return count

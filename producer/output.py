"""Writes result records as JSONL (one record per line), CSV (top-5 flattened) or
Parquet (top-5 as a list of structs; pyarrow, the ``parquet`` extra); an embedding
model's records as Parquet (the vector as a fixed-size list of float32) or NumPy
(an N x D float32 ``.npy`` matrix and a sidecar of the image names, in order)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TextIO

from shared.schemas import ResultRecord

if TYPE_CHECKING:
    import numpy as np

Format = Literal["jsonl", "csv", "parquet", "npy"]
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


def parquet_schema(dim: int | None = None) -> Any:
    """The Parquet columns: identity, error, and the top 5 as a list of structs; with
    ``dim`` (an embedding model's records), the vector as a fixed-size list of
    ``dim`` float32 (null for a failed image) and ``dim`` in place of the top 5."""
    import pyarrow as pa

    if dim is not None:
        return pa.schema(
            [
                ("job_id", pa.string()),
                ("image", pa.string()),
                ("model", pa.string()),
                ("embedding", pa.list_(pa.float32(), dim)),
                ("dim", pa.int32()),
                ("error_code", pa.string()),
                ("error_message", pa.string()),
            ]
        )

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


def write_parquet(
    records: Iterable[ResultRecord], path: str | Path | IO[bytes], *, dim: int | None = None
) -> int:
    """Write every record to a Parquet file (a path, or a writable binary stream such as
    an upload to a bucket), ``PARQUET_ROWS`` at a time; how many.

    ``dim``: the records are an embedding model's, of ``dim`` dimensions.
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("--format parquet needs pyarrow: pip install 'imgq[parquet]'") from None
    if dim is not None:
        return _write_embeddings_parquet(records, path, dim)
    schema = parquet_schema()
    count = 0
    where = str(path) if isinstance(path, str | Path) else path
    with pq.ParquetWriter(where, schema, compression="zstd") as writer:
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


def _write_embeddings_parquet(
    records: Iterable[ResultRecord], path: str | Path | IO[bytes], dim: int
) -> int:
    import numpy as np  # here: not at every `imgq` start
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema(dim)
    count = 0
    where = str(path) if isinstance(path, str | Path) else path
    with pq.ParquetWriter(where, schema, compression="zstd") as writer:
        rows: list[ResultRecord] = []

        def flush() -> None:
            matrix = np.zeros((len(rows), dim), np.float32)
            valid = np.zeros(len(rows), bool)
            for i, r in enumerate(rows):
                if r.embedding is not None:
                    if len(r.embedding) != dim:
                        raise ValueError(
                            f"{r.image}: a {len(r.embedding)}-dimensional vector in a "
                            f"{dim}-dimensional file (one embedding model per file)"
                        )
                    matrix[i] = r.embedding
                    valid[i] = True
            flat = pa.array(matrix.reshape(-1), type=pa.float32())
            vectors = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))
            table = pa.Table.from_arrays(
                [
                    pa.array([r.job_id for r in rows], pa.string()),
                    pa.array([r.image for r in rows], pa.string()),
                    pa.array([r.model for r in rows], pa.string()),
                    vectors,
                    pa.array([dim if v else None for v in valid], pa.int32()),
                    pa.array([r.error.code.value if r.error else None for r in rows], pa.string()),
                    pa.array([r.error.message if r.error else None for r in rows], pa.string()),
                ],
                schema=schema,
            )
            writer.write_table(table)
            rows.clear()

        for record in records:
            if record.top5:
                raise ValueError(f"{record.image}: a classifier's record in an embeddings file")
            rows.append(record)
            count += 1
            if len(rows) == PARQUET_ROWS:
                flush()
        if rows or count == 0:
            flush()
    return count


def names_path(path: str | Path) -> Path:
    """The sidecar of an ``.npy`` file, its image names one a line: ``x.npy`` -> ``x.names.txt``."""
    return Path(path).with_suffix(".names.txt")


def write_npy(
    batches: Iterable[tuple[list[str], np.ndarray]], path: str | Path, *, n: int, dim: int
) -> int:
    """Write ``n`` vectors of ``dim`` float32, arriving in batches of (names, matrix), as
    one ``.npy`` matrix (memory-mapped: never all in memory) and their names, in the
    same order, one a line in :func:`names_path`; how many rows."""
    import numpy as np  # here: not at every `imgq` start
    from numpy.lib.format import open_memmap

    out = open_memmap(str(path), mode="w+", dtype=np.float32, shape=(n, dim))
    written = 0
    try:
        with open(names_path(path), "w", encoding="utf-8", newline="\n") as names:
            for images, matrix in batches:
                m = len(images)
                if written + m > n or matrix.shape != (m, dim):
                    raise ValueError(f"expected {n} vectors of {dim} dimensions")
                out[written : written + m] = matrix
                for image in images:
                    names.write(image + "\n")
                written += m
        if written != n:
            raise ValueError(f"expected {n} vectors, got {written}")
        out.flush()
    finally:
        del out
    return written

"""The report read as a stream: images grouped within a window in either store's
order, the summary accumulated image by image, the HTML page written from spooled
rows (byte for byte the page the in-memory path writes), the gallery cap, memory
that does not grow with the records, and ``imgq report``'s code over both real
results stores."""

from __future__ import annotations

import os
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.api import Client
from producer.cli import write_reports
from producer.report import (
    ReportImage,
    SummaryBuilder,
    compare,
    group_records,
    iter_images,
    no_thumbnail,
    write_html_report,
    write_png_reports,
)
from shared.contract import task_id
from shared.schemas import ErrorCode, ImageRef, Prediction, ResultRecord
from shared.settings import Settings
from tests.browser import Browser
from tests.test_report import (
    ACTIVATIONS,
    JS_STATE,
    LABEL_SETS,
    example_records,
    failed,
    make_photo,
    ok,
    photos,
    report_data,
    synthetic_records,
)

__all__ = ["photos"]  # the fixture of real image files, shared with tests/test_report.py


def preds(seed: int, n: int = 5) -> list[Prediction]:
    """A top-5 whose classes depend on seed."""
    return [
        Prediction(index=seed + j, label=f"class {seed + j}", score=0.5 / (j + 1)) for j in range(n)
    ]


def redis_order(records: list[ResultRecord], models: list[str], chunk: int) -> list[ResultRecord]:
    """Records as the Redis store yields them: chunk by chunk, model by model."""
    by_image: dict[str, dict[str, ResultRecord]] = {}
    for r in records:
        by_image.setdefault(r.image, {})[r.model] = r
    srcs = list(by_image)
    out: list[ResultRecord] = []
    for start in range(0, len(srcs), chunk):
        for m in models:
            out.extend(by_image[s][m] for s in srcs[start : start + chunk] if m in by_image[s])
    return out


def two_models(n: int) -> list[ResultRecord]:
    """n images, models a and b, image by image (the PostgreSQL store's order)."""
    return [
        ok(f"img{i:03d}.jpg", m, preds(i + shift))
        for i in range(n)
        for m, shift in (("a", 0), ("b", 1))
    ]


def listing(images: list[ReportImage]) -> list[tuple[str, list[str]]]:
    """Each image's source and the models it has records of."""
    return [(im.src, sorted(im.records)) for im in images]


# --------------------------------------------------------------------------- grouping


def test_window_groups_both_store_orders_like_group_records() -> None:
    records = two_models(10)
    _models, expected = group_records(records)
    assert len(expected) == 10
    # PostgreSQL: an image's records side by side; a window of one image is enough.
    assert listing(list(iter_images(records, window=1))) == listing(expected)
    # Redis: a chunk's records for a, then the same chunk's for b; the chunk size is enough.
    in_chunks = redis_order(records, ["a", "b"], 4)
    assert in_chunks[:5] == [records[0], records[2], records[4], records[6], records[1]]
    assert listing(list(iter_images(in_chunks, window=4))) == listing(expected)
    # A window under the chunk size lets images go before their b records arrive.
    split = list(iter_images(in_chunks, window=3))
    assert len(split) > 10
    assert ("img000.jpg", ["a"]) in listing(split) and ("img000.jpg", ["b"]) in listing(split)
    with pytest.raises(ValueError):
        next(iter_images(records, window=0))


def test_duplicates_within_and_beyond_the_window() -> None:
    first, second = ok("dup.jpg", "a", preds(1)), ok("dup.jpg", "a", preds(50))
    records = [first, ok("x.jpg", "a", preds(2)), ok("y.jpg", "a", preds(3)), second]
    # Within the window (here, everything): one image, the later record wins, first place kept.
    for window in (3, None):
        images = list(iter_images(records, window=window))
        assert [im.src for im in images] == ["dup.jpg", "x.jpg", "y.jpg"]
        assert images[0].records["a"] is second
    assert [im.src for im in group_records(records)[1]] == ["dup.jpg", "x.jpg", "y.jpg"]
    # Further apart than the window: two images, each with its own record.
    images = list(iter_images(records, window=2))
    assert [im.src for im in images] == ["dup.jpg", "x.jpg", "y.jpg", "dup.jpg"]
    assert images[0].records["a"] is first and images[3].records["a"] is second


# --------------------------------------------------------------------------- summary


def test_summary_builder_equals_compare(photos: dict[str, Path]) -> None:
    cases: list[tuple[list[ResultRecord], dict[str, str] | None]] = [
        (example_records(photos), LABEL_SETS),
        (example_records(photos), None),
        (synthetic_records(300), LABEL_SETS),
        ([*two_models(20), failed("only-a.jpg", "a", ErrorCode.NOT_FOUND, "gone")], {"a": "s"}),
    ]
    for records, label_sets in cases:
        models, images = group_records(records)
        expected = compare(models, images, label_sets=label_sets)
        builder = SummaryBuilder(models, label_sets=label_sets)
        for image in iter_images(records, window=2):
            builder.add(image)
        assert builder.result() == expected
    # A result taken midway is a snapshot: adding more does not change it.
    models, images = group_records(synthetic_records(60))
    builder = SummaryBuilder(models, label_sets=LABEL_SETS)
    builder.add(images[0])
    early = builder.result()
    for image in images[1:]:
        builder.add(image)
    assert early == compare(models, images[:1], label_sets=LABEL_SETS)
    assert builder.result() == compare(models, images, label_sets=LABEL_SETS)


# --------------------------------------------------------------------------- HTML


def test_streamed_html_is_byte_identical(photos: dict[str, Path], tmp_path: Path) -> None:
    thumb = make_photo(tmp_path / "t.jpg", (40, 30), (1, 2, 3)).read_bytes()
    cases = [
        (example_records(photos), None, 2),
        # More images than one batch of rows, thumbnails in a thread pool.
        (synthetic_records(700), lambda src: thumb, 100),
    ]
    for n, (records, thumbnail, page_size) in enumerate(cases):
        models = list(dict.fromkeys(r.model for r in records))
        kwargs: dict[str, Any] = {
            "activations": ACTIVATIONS,
            "label_sets": LABEL_SETS,
            "thumbnail": thumbnail,
            "page_size": page_size,
            "title": "Cats & <dogs>",
        }
        held = write_html_report(records, tmp_path / f"held{n}" / "r.html", **kwargs)
        # Streamed once, in the PostgreSQL order and in the Redis order (chunks of 64).
        for order, stream in (
            ("pg", iter(records)),
            ("redis", iter(redis_order(records, models, 64))),
        ):
            out = tmp_path / f"{order}{n}" / "r.html"
            stats = write_html_report(stream, out, models=models, window=64, **kwargs)
            assert out.read_bytes() == held.path.read_bytes(), order
            assert (stats.images, stats.pages, stats.shown) == (
                held.images,
                held.pages,
                held.images,
            )
            assert stats.size_bytes == out.stat().st_size
            # Neither the spooled rows nor the temporary page stay behind.
            assert os.listdir(out.parent) == ["r.html"]


def test_max_images_caps_the_gallery_not_the_summary(tmp_path: Path, browser: Browser) -> None:
    records = synthetic_records(120)  # bit failed for images 49 and 99
    models = ["resnet50", "bit"]
    common: dict[str, Any] = {
        "activations": ACTIVATIONS,
        "label_sets": LABEL_SETS,
        "thumbnail": no_thumbnail,
    }
    out = tmp_path / "capped.html"
    stats = write_html_report(
        iter(records),
        out,
        models=models,
        max_images=10,
        page_size=4,
        **common,
    )
    assert (stats.images, stats.shown, stats.pages) == (120, 10, 3)
    text = out.read_text(encoding="utf-8")
    assert "Top-5 classes per model for 120 images; showing the first 10 of 120 images." in text
    assert '<div class="card-k">Images</div><div class="card-v">120</div>' in text
    assert '<div class="card-k">Failed results</div><div class="card-v">2</div>' in text
    data = report_data(text)
    srcs = list(dict.fromkeys(r.image for r in records))
    assert [row[0] for row in data["images"]] == srcs[:10]
    # The labels are those of the shown images, as in a report of those images alone.
    alone = tmp_path / "alone.html"
    write_html_report([r for r in records if r.image in srcs[:10]], alone, **common)
    alone_data = report_data(alone.read_text(encoding="utf-8"))
    assert data["labels"] == alone_data["labels"] and data["images"] == alone_data["images"]
    # The summary is over every image: the same tables as the uncapped page.
    full = tmp_path / "full.html"
    write_html_report(records, full, **common)
    full_text = full.read_text(encoding="utf-8")
    assert "showing the first" not in full_text

    def tables(page: str) -> str:
        return page[page.index('<section class="summary"') : page.index('<div class="toolbar"')]

    assert tables(text) == tables(full_text)
    # A cap at or over the image count changes nothing.
    same = tmp_path / "same.html"
    write_html_report(records, same, max_images=120, **common)
    assert same.read_bytes() == full.read_bytes()
    with pytest.raises(ValueError):
        write_html_report(records, tmp_path / "x.html", max_images=0, **common)

    browser.navigate(out.as_uri())
    state = browser.eval(JS_STATE)
    assert state["count"] == "10 images"
    assert (state["page"], state["pages"]) == ("1", "of 3")
    assert state["names"] == srcs[:4]
    assert browser.console == []


def records_stream(n: int) -> Iterator[ResultRecord]:
    """n one-model records, made as they are read (shared predictions: cheap to make)."""
    tops = [preds(k) for k in range(200)]
    for i in range(n):
        yield ResultRecord.model_construct(
            job_id="mem",
            image=f"/data/part{i // 1000:03d}/image_{i:06d}.jpg",
            model="alpha",
            top5=list(tops[i % 200]),
            error=None,
        )


def test_html_writer_does_not_hold_the_records(tmp_path: Path) -> None:
    # Warm up first: the template's compilation is not what is measured.
    write_html_report(records_stream(3), tmp_path / "warm.html", activations={}, models=["alpha"])
    peaks: dict[str, int] = {}
    for name, models in (("streamed", ["alpha"]), ("held", None)):
        tracemalloc.start()
        try:
            stats = write_html_report(
                records_stream(20_000),
                tmp_path / f"{name}.html",
                activations={},
                thumbnail=no_thumbnail,
                models=models,
                window=256,
            )
            peaks[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert stats.images == 20_000
    assert (tmp_path / "streamed.html").read_bytes() == (tmp_path / "held.html").read_bytes()
    # Holding 20,000 records takes tens of MB; the stream holds a window and a batch.
    assert peaks["streamed"] * 5 < peaks["held"], peaks


# --------------------------------------------------------------------------- real stores


def fill_job(client: Client, models: list[str], n: int, chunk: int) -> str:
    """A job of n images recorded in Redis, its results written straight into the
    client's results store (no worker): model b's last chunk never finished, and one
    source is submitted twice within a chunk."""
    job_id = "stream-" + uuid.uuid4().hex[:8]
    srcs = [f"/nowhere/img{i:03d}.jpg" for i in range(n)]
    srcs[3] = srcs[1]
    chunks = [[ImageRef(src=s, ref="") for s in srcs[i : i + chunk]] for i in range(0, n, chunk)]
    client.store.create(job_id, models, chunks, chunk_size=chunk)
    store = client.results_store
    for index, refs in enumerate(chunks):
        for m in models:
            if m == models[-1] and index == len(chunks) - 1:
                continue
            records = [
                ok(ref.src, m, preds(index * chunk + i + len(m))).model_copy(
                    update={"job_id": job_id}
                )
                if (index * chunk + i) % 7
                else failed(ref.src, m, ErrorCode.DECODE_FAILED, "corrupt").model_copy(
                    update={"job_id": job_id}
                )
                for i, ref in enumerate(refs)
            ]
            dicts = [r.to_json_dict() for r in records]
            if store.kind == "redis":
                client.app.backend.store_result(task_id(job_id, m, index), dicts, "SUCCESS")
            else:
                store.write_chunk(job_id, m, index * chunk, dicts)
            client.store.mark_finished(task_id(job_id, m, index), ok=len(refs), failed=0)
    return job_id


def test_report_code_streams_from_both_stores(
    redis_url: str, results_url: str, tmp_path: Path
) -> None:
    client = Client(Settings(broker_url=redis_url, results_url=results_url))
    models = ["m_first", "m_second"]  # alphabetical: the same columns either way
    job = client.job(fill_job(client, models, 10, 4))
    html, png_dir = tmp_path / "r.html", tmp_path / "png"
    write_reports(client, job, html, png_dir, page_size=5)

    # The same page as the records held in memory give (the CLI's title).
    held = write_html_report(
        job.results(),
        tmp_path / "held.html",
        activations={},
        page_size=5,
        title=f"imgq job {job.job_id}",
    )
    assert html.read_bytes() == held.path.read_bytes()
    data = report_data(html.read_text(encoding="utf-8"))
    # 10 submitted, one source twice within its chunk: 9 images, the later record kept.
    assert len(data["images"]) == held.images == 9
    assert [m["name"] for m in data["models"]] == models
    assert data["images"][-1][2][1] is None  # m_second's last chunk never finished
    pngs = sorted(p.name for p in png_dir.glob("*.png"))
    assert len(pngs) == 9 and pngs[0] == "00001_img000.jpg.png"


def test_png_names_are_as_wide_as_the_total_given(tmp_path: Path) -> None:
    records = [ok("b.jpg", "n", preds(1)), ok("a.jpg", "m", preds(2)), ok("a.jpg", "n", preds(3))]
    streamed = write_png_reports(
        iter(records), tmp_path / "s", activations={}, models=["m", "n"], total=1_234_567
    )
    assert [p.name for p in streamed] == ["0000001_b.jpg.png", "0000002_a.jpg.png"]
    held = write_png_reports(records, tmp_path / "h", activations={})
    assert [p.name for p in held] == ["00001_b.jpg.png", "00002_a.jpg.png"]

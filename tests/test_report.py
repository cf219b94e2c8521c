"""The model comparison report: grouping, agreement math, HTML, PNGs, and a real browser.

The records are built by hand: "resnet50" uses the ImageNet-1k labels with the
background class, "bit" the ImageNet-21k labels (real label texts), so classes are
matched across label sets by lemma. The HTML is opened in headless Chromium driven
over the DevTools protocol (``--remote-debugging-pipe``: no extra packages).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys
import time
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.report import (
    MatchMethod,
    ReportImage,
    activation_caption,
    compare,
    group_records,
    make_thumbnail,
    match_method,
    match_top5,
    model_info,
    no_thumbnail,
    png_name,
    write_html_report,
    write_png_reports,
)
from shared.labels import load_labels
from shared.registry import load_registry
from shared.schemas import ErrorCode, ErrorInfo, Prediction, ResultRecord
from tests.browser import Browser
from tests.conftest import ARTIFACTS

L1K = load_labels("imagenet1k-background")
L21K = load_labels("imagenet21k")
ACTIVATIONS = {"resnet50": "softmax", "bit": "sigmoid"}
LABEL_SETS = {"resnet50": "imagenet1k-background", "bit": "imagenet21k"}
SCRIPT_LABEL = "</script><script>window.__pwned = 1</script>"
ODD_NAME = 'odd "name" & \'quotes\' <b>bold</b> "><img src=x onerror=window.__pwned=2>.jpg'
URL_NAME = "https://example.com/photos/remote%20cat.jpg"


def p1k(label: str, score: float) -> Prediction:
    """A prediction of the ImageNet-1k (with background) model, by its real label text."""
    return Prediction(index=L1K.index(label), label=label, score=score)


def p21k(label: str, score: float) -> Prediction:
    """A prediction of the ImageNet-21k model, by its real label text."""
    return Prediction(index=L21K.index(label), label=label, score=score)


def ok(image: str, model: str, top5: list[Prediction]) -> ResultRecord:
    """A successful record."""
    return ResultRecord(job_id="job1", image=image, model=model, top5=top5)


def failed(image: str, model: str, code: ErrorCode, message: str) -> ResultRecord:
    """A failure record."""
    return ResultRecord(
        job_id="job1", image=image, model=model, error=ErrorInfo(code=code, message=message)
    )


def make_photo(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    """A small JPEG with a gradient, so thumbnails have something to show."""
    img = Image.new("RGB", size, color)
    px = img.load()
    assert px is not None
    for x in range(0, size[0], 4):
        for y in range(0, size[1], 4):
            px[x, y] = ((x * 255) // size[0], (y * 255) // size[1], color[2])
    img.save(path, quality=90)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, Path]:
    """Real image files for the cat, the dog and the oddly named image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    return {
        "cat": make_photo(folder / "cat.jpg", (320, 240), (200, 140, 90)),
        "dog": make_photo(folder / "dog.png", (200, 300), (90, 140, 200)),
        "odd": make_photo(folder / ODD_NAME.replace("/", "_"), (240, 240), (120, 200, 120)),
    }


def example_records(photos: dict[str, Path]) -> list[ResultRecord]:
    """Five images, two models; the agreement numbers are worked out in the tests."""
    cat, dog, odd = str(photos["cat"]), str(photos["dog"]), str(photos["odd"])
    missing = str(photos["cat"].parent / "missing.jpg")
    return [
        # cat: top-1 agrees; tabby + tiger cat (first lemma), tree frog (any lemma): 3/5.
        ok(
            cat,
            "resnet50",
            [
                p1k("tabby, tabby cat", 0.62),
                p1k("tiger cat", 0.20),
                p1k("Egyptian cat", 0.10),
                p1k("lynx, catamount", 0.03),
                p1k("tree frog, tree-frog", 0.01),
            ],
        ),
        ok(
            cat,
            "bit",
            [
                p21k("tabby, tabby cat", 0.91),
                p21k("domestic cat, house cat, Felis domesticus, Felis catus", 0.85),
                p21k("tiger cat", 0.40),
                p21k("kitten, kitty", 0.22),
                p21k("tree toad, tree frog, tree-frog", 0.05),
            ],
        ),
        # dog: top-1 differs; golden + Labrador retriever (first lemma): 2/5.
        ok(
            dog,
            "resnet50",
            [
                p1k("golden retriever", 0.70),
                p1k("Labrador retriever", 0.20),
                p1k("kuvasz", 0.05),
                p1k("tennis ball", 0.03),
                p1k("goldfinch, Carduelis carduelis", 0.01),
            ],
        ),
        ok(
            dog,
            "bit",
            [
                p21k("Labrador retriever", 0.80),
                p21k("golden retriever", 0.75),
                p21k("retriever", 0.50),
                p21k("dog, domestic dog, Canis familiaris", 0.45),
                p21k("kitten, kitty", 0.20),
            ],
        ),
        # missing: resnet50 failed, so the pair does not compare it.
        failed(missing, "resnet50", ErrorCode.NOT_FOUND, f"no such file: {missing}"),
        ok(
            missing,
            "bit",
            [
                p21k("tabby, tabby cat", 0.3),
                p21k("tiger cat", 0.2),
                p21k("kitten, kitty", 0.1),
                p21k("Egyptian cat", 0.05),
                p21k("Persian cat", 0.01),
            ],
        ),
        # odd name: top-1 agrees; tench, goldfish (first lemma), electric ray <-> torpedo and
        # goldfinch <-> New World goldfinch (any lemma): 4/5. A hostile label at rank 5.
        ok(
            odd,
            "resnet50",
            [
                p1k("tench, Tinca tinca", 0.50),
                p1k("goldfish, Carassius auratus", 0.20),
                p1k("electric ray, crampfish, numbfish, torpedo", 0.10),
                p1k("goldfinch, Carduelis carduelis", 0.05),
                Prediction(index=999, label=SCRIPT_LABEL, score=0.01),
            ],
        ),
        ok(
            odd,
            "bit",
            [
                p21k("tench, Tinca tinca", 0.60),
                p21k("goldfish, Carassius auratus", 0.30),
                Prediction(index=11368, label="torpedo", score=0.2),
                p21k("New World goldfinch, goldfinch, yellowbird, Spinus tristis", 0.1),
                p21k("kitten, kitty", 0.02),
            ],
        ),
        # a URL: both classified, never fetched for a thumbnail; bit failed to fetch.
        ok(
            URL_NAME,
            "resnet50",
            [
                p1k("Persian cat", 0.5),
                p1k("tabby, tabby cat", 0.2),
                p1k("tiger cat", 0.1),
                p1k("Egyptian cat", 0.1),
                p1k("lynx, catamount", 0.05),
            ],
        ),
        failed(URL_NAME, "bit", ErrorCode.FETCH_FAILED, "HTTP 404 <Not Found> & gone"),
    ]


# --------------------------------------------------------------------------- math


def test_labels_used_are_real() -> None:
    assert L21K[11368] == "torpedo"
    assert L1K[0] == "background"
    assert L1K.index("tabby, tabby cat") == 282


def test_group_records_keeps_first_seen_order(photos: dict[str, Path]) -> None:
    records = example_records(photos)
    models, images = group_records(records)
    assert models == ["resnet50", "bit"]
    assert [im.src for im in images] == [
        str(photos["cat"]),
        str(photos["dog"]),
        str(photos["cat"].parent / "missing.jpg"),
        str(photos["odd"]),
        URL_NAME,
    ]
    assert all(set(im.records) == {"resnet50", "bit"} for im in images)
    # Interleaved input: bit first for a new image still keeps model order by first sight.
    models2, images2 = group_records([records[1], records[0], records[3], records[2]])
    assert models2 == ["bit", "resnet50"]
    assert [im.src for im in images2] == [str(photos["cat"]), str(photos["dog"])]


def test_match_across_label_sets_by_lemma() -> None:
    tabby1k = p1k("tabby, tabby cat", 0.5)
    assert match_method(tabby1k, p21k("tabby, tabby cat", 0.5), same_label_set=False) == (
        MatchMethod.FIRST_LEMMA
    )
    # first lemma, case-insensitive: "tabby" is also the first lemma of "tabby, queen".
    queen = p21k("tabby, queen", 0.5)
    assert match_method(tabby1k, queen, same_label_set=False) == MatchMethod.FIRST_LEMMA
    upper = Prediction(index=5, label="TABBY , striped cat", score=0.1)
    assert match_method(tabby1k, upper, same_label_set=False) == MatchMethod.FIRST_LEMMA
    frog = p1k("tree frog, tree-frog", 0.1)
    toad = p21k("tree toad, tree frog, tree-frog", 0.1)
    assert match_method(frog, toad, same_label_set=False) == MatchMethod.ANY_LEMMA
    assert match_method(tabby1k, p21k("tiger cat", 0.1), same_label_set=False) is None
    # Same label set: by index only, never by text.
    same = Prediction(index=282, label="something else", score=0.1)
    assert match_method(tabby1k, same, same_label_set=True) == MatchMethod.INDEX
    other = Prediction(index=283, label="tabby, tabby cat", score=0.1)
    assert match_method(tabby1k, other, same_label_set=True) is None
    # Unknown label sets: same index and same text counts as an index match.
    assert match_method(tabby1k, tabby1k, same_label_set=None) == MatchMethod.INDEX
    # One-to-one: the exact label wins over another class with the same first lemma.
    matches = match_top5([tabby1k], [queen, p21k("tabby, tabby cat", 0.4)], same_label_set=False)
    assert matches == [(0, 1, MatchMethod.FIRST_LEMMA)]


def test_compare_known_example(photos: dict[str, Path]) -> None:
    models, images = group_records(example_records(photos))
    summary = compare(models, images, label_sets=LABEL_SETS)
    assert summary.images == 5
    assert summary.models == ["resnet50", "bit"]
    assert summary.failures == {"resnet50": 1, "bit": 1}
    assert summary.per_model["resnet50"].errors == {"not_found": 1}
    assert summary.per_model["bit"].errors == {"fetch_failed": 1}
    assert summary.per_model["bit"].ok == 4
    (pair,) = summary.pairs
    assert (pair.model_a, pair.model_b) == ("resnet50", "bit")
    assert pair.same_label_set is False
    # Compared: cat, dog, odd (missing and the URL each have a failure).
    assert pair.compared == 3
    # Top-1: cat agrees (tabby), dog differs (golden vs Labrador), odd agrees (tench).
    assert pair.top1_agree == 2
    assert pair.top1_agreement == pytest.approx(2 / 3)
    # Overlap: cat 3/5, dog 2/5, odd 4/5 -> mean 0.6.
    assert pair.mean_top5_overlap == pytest.approx((3 / 5 + 2 / 5 + 4 / 5) / 3)
    # cat: 2 first + 1 any; dog: 2 first; odd: 2 first + 2 any.
    assert pair.methods == {"first lemma": 6, "any lemma": 3}


def test_compare_same_label_set_by_index_and_no_overlap_cases() -> None:
    a = [Prediction(index=i, label=f"class {i}", score=0.1) for i in (1, 2, 3, 4, 5)]
    b = [Prediction(index=i, label=f"other {i}", score=0.1) for i in (2, 1, 9, 8, 7)]
    image = ReportImage(
        src="x.jpg",
        records={
            "m1": ok("x.jpg", "m1", a),
            "m2": ok("x.jpg", "m2", b),
            "m3": ok("x.jpg", "m3", b),
        },
    )
    empty = ReportImage(src="y.jpg", records={"m1": ok("y.jpg", "m1", a)})
    summary = compare(["m1", "m2", "m3"], [image, empty], label_sets={"m1": "s", "m2": "s"})
    p12, p13, p23 = summary.pairs
    assert (p12.compared, p12.top1_agree, p12.methods) == (1, 0, {"index": 2})
    assert p12.mean_top5_overlap == pytest.approx(2 / 5)
    # m3's label set is unknown: same index but different text is no match.
    assert (p13.compared, p13.methods, p13.mean_top5_overlap) == (1, {}, 0.0)
    assert p23.same_label_set is None
    assert p23.top1_agreement == 1.0 and p23.methods == {"index": 5}
    assert summary.per_model["m2"].missing == 1
    nothing = compare(["m1", "m2"], [empty])
    assert nothing.pairs[0].compared == 0 and nothing.pairs[0].top1_agreement is None


def test_activation_captions_and_model_info(tmp_path: Path) -> None:
    assert activation_caption("softmax") == "softmax probability"
    assert activation_caption("sigmoid") == "sigmoid, multi-label"
    assert activation_caption(None) == "score"
    (tmp_path / "models.toml").write_text(
        '[models.mine]\nhandle = "m"\nlabels = "labels.txt"\nactivation = "none"\n',
        encoding="utf-8",
    )
    activations, label_sets = model_info(load_registry(tmp_path / "models.toml"))
    assert activations["resnet50"] == "softmax" and activations["bit_m_r152x4"] == "sigmoid"
    assert activations["mine"] == "none"
    assert label_sets["resnet50"] == "imagenet1k-background"
    assert label_sets["mine"] == str((tmp_path / "labels.txt").resolve())


# --------------------------------------------------------------------------- thumbnails


def test_make_thumbnail_rotates_by_exif_and_fails_quietly(tmp_path: Path) -> None:
    img = Image.new("RGB", (400, 200), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = tmp_path / "rotated.jpg"
    img.save(rotated, exif=exif)
    thumb = make_thumbnail(str(rotated))
    assert thumb is not None
    with Image.open(io.BytesIO(thumb)) as t:
        assert t.format == "JPEG"
        assert t.size == (80, 160)
    rgba = tmp_path / "alpha.png"
    Image.new("RGBA", (50, 30), (0, 0, 0, 0)).save(rgba)
    assert make_thumbnail(str(rgba)) is not None
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    assert make_thumbnail(str(tmp_path / "junk.jpg")) is None
    assert make_thumbnail(str(tmp_path / "nope.jpg")) is None
    assert make_thumbnail(str(tmp_path)) is None
    assert make_thumbnail("https://example.com/a.jpg") is None


# --------------------------------------------------------------------------- HTML


DATA_RE = re.compile(r'<script type="application/json" id="imgq-data">(.*?)</script>', re.S)


def report_data(html_text: str) -> dict[str, Any]:
    """The embedded JSON block, parsed."""
    match = DATA_RE.search(html_text)
    assert match, "no data block"
    data: dict[str, Any] = json.loads(match.group(1))
    return data


def test_html_report_content_and_escaping(photos: dict[str, Path], tmp_path: Path) -> None:
    records = example_records(photos)
    out = tmp_path / "report.html"
    stats = write_html_report(
        records,
        out,
        activations=ACTIVATIONS,
        label_sets=LABEL_SETS,
        page_size=2,
        title="Cats & <dogs>",
    )
    text = out.read_text(encoding="utf-8")
    assert stats.size_bytes == out.stat().st_size
    assert (stats.images, stats.pages) == (5, 3)

    data = report_data(text)
    assert [m["name"] for m in data["models"]] == ["resnet50", "bit"]
    assert [m["caption"] for m in data["models"]] == ["softmax probability", "sigmoid, multi-label"]
    assert data["pageSize"] == 2
    by_src = {row[0]: row for row in data["images"]}
    models, images = group_records(records)
    assert [row[0] for row in data["images"]] == [im.src for im in images]
    for image in images:
        row = by_src[image.src]
        for m_index, model in enumerate(models):
            record = image.records[model]
            result = row[2][m_index]
            if record.error is not None:
                assert result == {"c": record.error.code.value, "m": record.error.message}
            else:
                assert [data["labels"][p[0]] for p in result] == [p.label for p in record.top5]
                assert [p[1] for p in result] == [p.index for p in record.top5]
                assert [p[2] for p in result] == pytest.approx([p.score for p in record.top5])
    # Thumbnails: real files embedded as JPEG; the URL and the missing file get none.
    cat_thumb = base64.b64decode(by_src[str(photos["cat"])][1])
    with Image.open(io.BytesIO(cat_thumb)) as t:
        assert t.format == "JPEG" and max(t.size) == 160
    assert by_src[URL_NAME][1] == ""
    assert by_src[str(photos["cat"].parent / "missing.jpg")][1] == ""
    # Agreement flags and "in the other model's top-5" marks.
    assert by_src[str(photos["cat"])][3] is True
    assert by_src[str(photos["dog"])][3] is False
    assert by_src[URL_NAME][3] is None
    assert [p[3] for p in by_src[str(photos["cat"])][2][0]] == [1, 1, 0, 0, 1]

    # Escaping: nothing user-given can open or close an element.
    assert text.count("</script>") == 2
    assert "<script>window.__pwned" not in text
    assert "<img src=x" not in text
    assert "<b>bold" not in text
    assert "<title>Cats &amp; &lt;dogs&gt;</title>" in text
    assert "HTTP 404 <Not" not in text
    # Self-contained: no URL in any src/href attribute, and a CSP that forbids fetching.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "http://" not in text.replace(URL_NAME, "")
    assert "https://" not in text.replace(URL_NAME, "")
    assert "default-src 'none'" in text
    # The summary, rendered in the page itself.
    assert "66.7%" in text and "60.0%" in text
    assert "first lemma &times; 6" in text and "any lemma &times; 3" in text
    assert "not_found &times; 1" in text


def test_html_report_missing_results_no_thumbnails_bad_page_size(tmp_path: Path) -> None:
    records = [
        ok("a.jpg", "m", [Prediction(index=0, label="x", score=1.0)]),
        ok("b.jpg", "n", [Prediction(index=1, label="y", score=float("nan"))]),
    ]
    stats = write_html_report(
        records, tmp_path / "r.html", activations={"n": "none"}, thumbnail=no_thumbnail
    )
    assert (stats.images, stats.pages) == (2, 1)
    data = report_data((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert data["images"][0][1] == ""
    assert [m["caption"] for m in data["models"]] == ["score", "model's own probability"]
    # A model without a record for an image: null (shown as "no result"); NaN becomes 0.
    assert data["images"][0][2][1] is None and data["images"][1][2][0] is None
    assert data["images"][1][2][1] == [[1, 1, 0.0, 0]]
    with pytest.raises(ValueError):
        write_html_report(records, tmp_path / "r.html", activations={}, page_size=0)


# fmt: off
PAGE_TAGS = {
    "html", "head", "meta", "link", "title", "style", "body", "header", "h1", "p", "section",
    "div", "h2", "table", "thead", "tr", "th", "tbody", "td", "span", "input", "label",
    "select", "button", "main", "noscript", "script",
}  # the elements the report's page is made of
# fmt: on


class _Page(HTMLParser):
    """The elements, text, <title> and <script> bodies of a page, as a browser parses them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.title = ""
        self.text = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in ("title", "script") else None
        if tag == "script":
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data
        elif self._in == "script":
            self.scripts[-1] += data
        if self._in != "script":
            self.text += data


def test_html_report_user_text_is_inert(tmp_path: Path) -> None:
    # A file name, a label, a model name, an error message, a job id and a title
    # that each try to close the element or attribute they land in and open a script.
    attack = "\"'</script><script>alert(1)</script><!--<img src=x onerror=alert(2)>&amp;\u2028"
    name, label, model = f"photo {attack}.jpg", f"cat, {attack}", f"m{attack}"
    records = [
        ResultRecord(
            job_id=f"job{attack}",
            image=name,
            model=model,
            top5=[Prediction(index=7, label=label, score=0.5)],
        ),
        ResultRecord(
            job_id=f"job{attack}",
            image=name,
            model="plain",
            error=ErrorInfo(code=ErrorCode.DECODE_FAILED, message=f"bad {attack}"),
        ),
    ]
    out = tmp_path / "inert.html"
    write_html_report(records, out, activations={}, thumbnail=no_thumbnail, title=f"T {attack}")
    text = out.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()

    # Only the page's own elements: no img, no event handler, exactly two scripts
    # (the JSON block and the renderer), and the title reads back as given.
    assert {tag for tag, _ in page.tags} <= PAGE_TAGS
    assert not [a for _, attrs in page.tags for a in attrs if a.startswith("on")]
    assert [attrs for tag, attrs in page.tags if tag == "script"] == [
        {"type": "application/json", "id": "imgq-data"},
        {},
    ]
    assert page.title == f"T {attack}"
    # The summary shows the model name and job id as text, decoded to what was given.
    assert f"m{attack}" in page.text and f"job{attack}" in page.text
    # The JSON block: no character that could end it, and every value round-trips.
    block = page.scripts[0]
    assert not set(block) & {"<", ">", "&", "\u2028"}
    data = json.loads(block)
    assert data["images"][0][0] == name
    assert data["labels"] == [label]
    assert [m["name"] for m in data["models"]] == [model, "plain"]
    assert data["images"][0][2][1] == {"c": "decode_failed", "m": f"bad {attack}"}
    # The script block is the package's renderer, byte for byte.
    assert (
        page.scripts[1]
        == (resources.files("producer.report") / "static" / "report.js").read_text("utf-8").strip()
    )


# --------------------------------------------------------------------------- PNG


def test_png_reports(photos: dict[str, Path], tmp_path: Path) -> None:
    pyplot_before = "matplotlib.pyplot" in sys.modules
    records = example_records(photos)
    out_dir = tmp_path / "png"
    paths = write_png_reports(records, out_dir, activations=ACTIVATIONS)
    assert len(paths) == 5
    assert len({p.name for p in paths}) == 5
    assert [p.name[:6] for p in paths] == ["00001_", "00002_", "00003_", "00004_", "00005_"]
    assert paths[0].name == "00001_cat.jpg.png"
    assert paths[4].name == "00005_remote_20cat.jpg.png"
    for path in paths:
        assert path.parent == out_dir and path.exists()
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name), path.name
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG"
            width, height = img.size
            assert 900 <= width <= 2400 and 250 <= height <= 600, img.size
            # Not blank: the bars and the picture leave many colours.
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    if not pyplot_before:
        assert "matplotlib.pyplot" not in sys.modules
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(paths[0], ARTIFACTS / "report-png-cat.png")
    shutil.copy(paths[2], ARTIFACTS / "report-png-failed.png")


def test_png_names_are_sanitized_and_unique() -> None:
    assert png_name(3, "/a/b/c d<e>.jpg") == "00003_c_d_e_.jpg.png"
    assert png_name(1, "https://h/x/y.png?size=2") == "00001_y.png.png"
    assert png_name(2, "C:\\pics\\z.jpg") == "00002_z.jpg.png"
    assert png_name(4, "...") == "00004_image.png"
    assert png_name(5, "dir/") == "00005_dir.png"


# --------------------------------------------------------------------------- browser


JS_STATE = """(() => {
  const grid = document.getElementById('grid');
  return {
    headers: [...grid.querySelectorAll('.hd')].map(e => e.textContent),
    names: [...grid.querySelectorAll('.cell.img .name')].map(e => e.textContent),
    labels: [...grid.querySelectorAll('.cell.img')].map(c => {
      const out = [];
      let n = c.nextElementSibling;
      while (n && n.classList.contains('model')) {
        out.push([...n.querySelectorAll('.lbl')].map(e => e.textContent));
        n = n.nextElementSibling;
      }
      return out;
    }),
    errors: [...grid.querySelectorAll('.err .code')].map(e => e.textContent),
    pages: document.getElementById('pages').textContent,
    page: document.getElementById('page').value,
    count: document.getElementById('count').textContent,
    urls: [...document.querySelectorAll('[src],[href]')]
      .map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => !u.startsWith('data:')),
    pwned: window.__pwned === undefined ? null : window.__pwned,
    widths: [...grid.querySelectorAll('.fill')].slice(0, 5).map(e => e.style.width),
  };
})()"""


def set_filter(browser: Browser, text: str) -> None:
    """Type into the filter box and wait for the debounced render."""
    browser.eval(
        "(() => { const q = document.getElementById('q'); q.value = "
        + json.dumps(text)
        + "; q.dispatchEvent(new Event('input')); })()"
    )
    time.sleep(0.4)


def test_html_report_in_browser(photos: dict[str, Path], tmp_path: Path, browser: Browser) -> None:
    records = example_records(photos)
    out = tmp_path / "report.html"
    write_html_report(records, out, activations=ACTIVATIONS, label_sets=LABEL_SETS, page_size=4)
    browser.navigate(out.as_uri())
    state = browser.eval(JS_STATE)
    assert state["headers"] == [
        "Image",
        "resnet50 (softmax probability)",
        "bit (sigmoid, multi-label)",
    ]
    models, images = group_records(records)
    assert state["names"] == [im.src for im in images[:4]]
    first = images[0]
    assert state["labels"][0] == [[p.label for p in first.records[m].top5] for m in models]
    assert SCRIPT_LABEL in state["labels"][3][0]
    assert state["errors"] == ["not_found"]
    assert state["widths"] == ["62%", "20%", "10%", "3%", "1%"]
    assert (state["page"], state["pages"]) == ("1", "of 2")
    assert state["urls"] == []
    assert state["pwned"] is None
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.screenshot(ARTIFACTS / "report-small.png")

    browser.eval("document.getElementById('next').click()")
    state = browser.eval(JS_STATE)
    assert state["names"] == [URL_NAME]
    assert state["errors"] == ["fetch_failed"]
    assert state["page"] == "2"

    set_filter(browser, "TIGER cat")
    state = browser.eval(JS_STATE)
    assert state["names"] == [
        str(photos["cat"]),
        str(photos["cat"].parent / "missing.jpg"),
        URL_NAME,
    ]
    assert state["page"] == "1" and state["count"] == "3 of 5 images"
    set_filter(browser, "")
    browser.eval(
        "(() => { const f = document.getElementById('fail'); f.checked = true;"
        " f.dispatchEvent(new Event('change')); })()"
    )
    state = browser.eval(JS_STATE)
    assert state["names"] == [str(photos["cat"].parent / "missing.jpg"), URL_NAME]
    set_filter(browser, "no match at all")
    assert "No images match." in browser.eval("document.getElementById('grid').textContent")
    assert browser.console == []


def synthetic_records(n: int) -> list[ResultRecord]:
    """n images, two models, every 50th image failed for bit."""
    in21k = {label: index for index, label in enumerate(L21K)}
    records: list[ResultRecord] = []
    for i in range(n):
        src = f"/data/batch{i // 1000:02d}/img_{i:05d}.jpg"
        k = (i * 7) % 990 + 1
        records.append(
            ok(
                src,
                "resnet50",
                [Prediction(index=k + j, label=L1K[k + j], score=0.5 / (j + 1)) for j in range(5)],
            )
        )
        if i % 50 == 49:
            records.append(failed(src, "bit", ErrorCode.DECODE_FAILED, "corrupt data"))
        else:
            top = [in21k.get(L1K[k + j], 100 + j) for j in range(5)]
            records.append(
                ok(
                    src,
                    "bit",
                    [
                        Prediction(index=t, label=L21K[t], score=0.9 / (j + 1))
                        for j, t in enumerate(top)
                    ],
                )
            )
    return records


@pytest.fixture(scope="module")
def sample_thumbnail() -> bytes:
    """A realistic 160 px JPEG thumbnail (a photo-like gradient with noise)."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:160]
    base = np.stack([xx * 1.5, yy * 2.0, (xx + yy)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=78, optimize=True)
    return buf.getvalue()


def test_html_report_10k_images(tmp_path: Path, browser: Browser, sample_thumbnail: bytes) -> None:
    records = synthetic_records(10_000)
    out = tmp_path / "big.html"
    start = time.monotonic()
    stats = write_html_report(
        records,
        out,
        activations=ACTIVATIONS,
        label_sets=LABEL_SETS,
        thumbnail=lambda src: sample_thumbnail,
    )
    build_s = time.monotonic() - start
    assert (stats.images, stats.pages) == (10_000, 100)
    assert stats.size_bytes == out.stat().st_size
    assert build_s < 20, f"building took {build_s:.1f} s"
    load_s = browser.navigate(out.as_uri(), timeout=120)
    state = browser.eval(JS_STATE)
    assert (state["page"], state["pages"]) == ("1", "of 100")
    assert state["count"] == "10,000 images"
    assert state["names"] == [f"/data/batch00/img_{i:05d}.jpg" for i in range(100)]
    assert state["labels"][0][0] == list(L1K[1:6])
    assert state["errors"] == ["decode_failed", "decode_failed"]
    browser.screenshot(ARTIFACTS / "report-10k.png")
    browser.eval(
        "(() => { const p = document.getElementById('page'); p.value = '100';"
        " p.dispatchEvent(new Event('change')); })()"
    )
    state = browser.eval(JS_STATE)
    assert state["names"][-1] == "/data/batch09/img_09999.jpg"
    assert state["page"] == "100"
    browser.eval(
        "(() => { const s = document.getElementById('size'); s.value = '250';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    state = browser.eval(JS_STATE)
    assert (state["page"], state["pages"]) == ("40", "of 40")
    assert len(state["names"]) == 250
    set_filter(browser, "img_0424")
    state = browser.eval(JS_STATE)
    assert state["names"] == [f"/data/batch04/img_0424{d}.jpg" for d in range(10)]
    assert browser.console == []
    (ARTIFACTS / "report-10k.txt").write_text(
        f"images {stats.images}, pages {stats.pages}, size {stats.size_bytes} bytes, "
        f"build {build_s:.2f} s, browser load {load_s:.2f} s\n",
        encoding="utf-8",
    )
    print(
        f"10k report: {stats.size_bytes / 1e6:.1f} MB, build {build_s:.2f} s, load {load_s:.2f} s"
    )

"""Training a head on your own labels: the training set read from folders and
manifests, the refusals, the fit and its evaluation, the folded head, the printed
metrics and the HTML report in a real browser. No Redis, no workers: the vectors are
synthetic clusters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer import training
from producer.training import (
    FitResult,
    TrainingError,
    check_labels,
    fit_head,
    format_metrics,
    head_probabilities,
    read_training_set,
    write_report,
)
from tests.browser import Browser

ODD_LABEL = '<b>bold</b> & "quotes" </style><script>window.__pwned = 1</script>'
NAMES = ["chat noir", "Café crème", "Ωmega", ODD_LABEL]


def touch(path: Path) -> Path:
    """An empty file (the training set's reader never opens the images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def clusters(
    per_label: list[int], *, dim: int = 16, spread: float = 0.35, seed: int = 1
) -> tuple[np.ndarray, list[str]]:
    """Gaussian clusters, one per label (named from NAMES, then 'label N'), well apart."""
    rng = np.random.default_rng(seed)
    names = [*NAMES, *(f"label {i}" for i in range(len(NAMES), len(per_label)))]
    vectors, labels = [], []
    for i, n in enumerate(per_label):
        centre = rng.standard_normal(dim) * 2 + 5  # away from 0: the scaler matters
        vectors.append(centre + spread * rng.standard_normal((n, dim)))
        labels += [names[i]] * n
    order = rng.permutation(len(labels))
    return np.vstack(vectors).astype(np.float32)[order], [labels[i] for i in order]


# --------------------------------------------------------------------------- reading
def test_folder_one_subfolder_per_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    touch(data / "chat noir" / "a.jpg")
    touch(data / "chat noir" / "deeper" / "b.PNG")
    touch(data / "Café crème" / "c.webp")
    touch(data / "Café crème" / "notes.txt")  # not an image: left out, as submit does
    touch(data / ".hidden" / "d.jpg")
    (data / "empty label").mkdir()
    monkeypatch.chdir(tmp_path)

    got = read_training_set("data")

    assert got.labels == ["Café crème", "chat noir", "chat noir"]
    assert [r.src for r in got.refs] == [
        "data/Café crème/c.webp",
        "data/chat noir/a.jpg",
        "data/chat noir/deeper/b.PNG",
    ]
    assert got.refs[0].ref == str(data / "Café crème" / "c.webp")


def test_folder_labels_are_nfc(tmp_path: Path) -> None:
    """A folder name in NFD (as macOS writes it) is the same label as one typed in NFC."""
    touch(tmp_path / "Cafe\u0301" / "a.jpg")
    touch(tmp_path / "dog" / "b.jpg")
    assert read_training_set(str(tmp_path)).labels == ["Caf\u00e9", "dog"]


def test_csv_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    touch(folder / "img" / "one.jpg")
    touch(folder / "img" / "two.jpg")
    elsewhere = touch(tmp_path / "abs.jpg")
    manifest = folder / "train.csv"
    manifest.write_text(
        "image,label\n"
        "img/one.jpg,chat noir\n"
        f'{elsewhere}," Ωmega "\n'
        "\n"
        'https://example.com/p%20q.jpg,"a, b"\n'
        "s3://bucket/key.jpg,chat noir\n"
        "img/two.jpg,Ωmega\n",
        encoding="utf-8",
    )
    got = read_training_set(str(manifest))
    assert got.labels == ["chat noir", "Ωmega", "a, b", "chat noir", "Ωmega"]
    assert [r.ref for r in got.refs] == [
        str(folder / "img" / "one.jpg"),  # relative to the manifest's folder
        str(elsewhere),
        "https://example.com/p%20q.jpg",
        "s3://bucket/key.jpg",
        str(folder / "img" / "two.jpg"),
    ]
    assert got.refs[0].src == "img/one.jpg"


def test_csv_manifest_other_delimiter_and_columns(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("label;note;image\ncat;x;a.jpg\ndog;y;b.jpg\n", encoding="utf-8")
    got = read_training_set(str(manifest))
    assert got.labels == ["cat", "dog"]
    assert [r.src for r in got.refs] == ["a.jpg", "b.jpg"]


def test_jsonl_manifest(tmp_path: Path) -> None:
    touch(tmp_path / "photos" / "x" / "1.jpg")
    touch(tmp_path / "photos" / "x" / "2.jpg")
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"image": "photos/x", "label": "Café crème"},  # a folder: every image gets the label
        {"image": "https://example.com/a.jpg", "label": ODD_LABEL},
    ]
    manifest.write_text(
        "\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n\n",
        encoding="utf-8",
    )
    got = read_training_set(str(manifest))
    assert got.labels == ["Café crème", "Café crème", ODD_LABEL]
    assert [r.ref for r in got.refs][:2] == [
        str(tmp_path / "photos" / "x" / "1.jpg"),
        str(tmp_path / "photos" / "x" / "2.jpg"),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.csv", "image,label\na.jpg,cat\nb.jpg,\n", "m.csv:3: empty label"),
        ("m.csv", "image,label\na.jpg,cat\n,dog\n", "m.csv:3: no image"),
        ("m.csv", "image,label\na.jpg,cat\nb.jpg\n", "m.csv:3: no label"),
        ("m.csv", "path,class\na.jpg,cat\n", "the header must name the columns image and label"),
        (
            "m.jsonl",
            '{"image": "a.jpg", "label": "cat"}\n{"image": "b.jpg"}\n',
            "m.jsonl:2: no label",
        ),
        ("m.jsonl", '{"image": "a.jpg", "label": "  "}\n', "m.jsonl:1: empty label"),
        ("m.jsonl", '{"label": "cat"}\n', "m.jsonl:1: no image"),
        ("m.jsonl", '{"image": "a.jpg", "label": "cat"}\n{oops\n', "m.jsonl:2: not JSON"),
        ("m.jsonl", '"a.jpg"\n', 'm.jsonl:1: expected an object with "image" and "label"'),
        ("m.jsonl", "\n\n", "lists no images"),
        ("m.jsonl", '{"image": "nothing/*.jpg", "label": "cat"}\n', "m.jsonl:1: no file matches"),
    ],
)
def test_bad_manifest_lines_are_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    manifest = tmp_path / name
    manifest.write_text(text, encoding="utf-8")
    with pytest.raises(TrainingError) as info:
        read_training_set(str(manifest))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_refused_data(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"no such file or folder: '.*nowhere'"):
        read_training_set(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="has no label subfolders with images"):
        read_training_set(str(tmp_path / "empty"))
    touch(tmp_path / "noimages" / "cat" / "readme.txt")
    with pytest.raises(TrainingError, match="has no label subfolders with images"):
        read_training_set(str(tmp_path / "noimages"))
    touch(tmp_path / "loose" / "cat" / "a.jpg")
    touch(tmp_path / "loose" / "stray.jpg")
    with pytest.raises(TrainingError, match=r"images outside a label subfolder \('stray.jpg'\)"):
        read_training_set(str(tmp_path / "loose"))
    touch(tmp_path / "list.txt")
    with pytest.raises(TrainingError, match=r"neither a folder .* nor a .csv or .jsonl manifest"):
        read_training_set(str(tmp_path / "list.txt"))


# --------------------------------------------------------------------------- labels
def test_check_labels_refusals() -> None:
    with pytest.raises(TrainingError, match=r"only one label \('cat', 3 images\)"):
        check_labels(["cat", "cat", "cat"])
    with pytest.raises(
        TrainingError,
        match=r"at least 2 images: 'Café crème' \(1 image\), 'chat noir' \(1 image\)$",
    ):
        check_labels(["dog", "dog", "chat noir", "Café crème"])
    with pytest.raises(TrainingError, match="no images to train on"):
        check_labels([])
    many = [f"l{i}" for i in range(8)] + ["ok", "ok"]
    with pytest.raises(TrainingError, match=r"'l4' \(1 image\) and 3 more$"):
        check_labels(many)
    check_labels(["a", "a", "b", "b"])  # passes


def test_fit_head_refuses_before_fitting() -> None:
    with pytest.raises(TrainingError, match="only one label"):
        fit_head(np.zeros((3, 4), np.float32), ["a"] * 3)
    with pytest.raises(TrainingError, match="one vector per label"):
        fit_head(np.zeros((3, 4), np.float32), ["a", "a", "b", "b"])
    bad = np.zeros((4, 2), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(TrainingError, match="NaN or infinite"):
        fit_head(bad, ["a", "a", "b", "b"])


# --------------------------------------------------------------------------- the fit
def summary(result: FitResult) -> dict[str, Any]:
    return {k: v for k, v in result.metrics.items() if k != "fit_seconds"}


def test_validation_split_at_ten_per_label() -> None:
    vectors, labels = clusters([12, 10, 15, 20])
    result = fit_head(vectors, labels)
    m = result.metrics
    assert m["evaluation"] == "validation"
    assert m["accuracy"] >= 0.95
    assert m["n_validation"] == 12 and m["n_train"] == 45  # 20% of 57, rounded up
    assert "folds" not in m
    assert result.classes == sorted(NAMES) == m["classes"]
    assert result.weights.shape == (16, 4) and result.weights.dtype == np.float32
    assert result.bias.shape == (4,) and result.bias.dtype == np.float32
    assert m["C"] in training.C_GRID and m["dim"] == 16
    assert np.array(m["confusion"]).sum() == 12
    assert sum(s["support"] for s in m["per_label"].values()) == 12
    # every label held out in proportion (stratified)
    assert min(s["support"] for s in m["per_label"].values()) >= 2
    json.dumps(m)  # JSON-ready
    # The head separates every image, training and validation.
    predicted = head_probabilities(vectors, result.weights, result.bias).argmax(axis=1)
    assert [result.classes[i] for i in predicted] == labels


def test_cross_validation_below_ten_per_label() -> None:
    vectors, labels = clusters([9, 12, 4, 30])
    m = fit_head(vectors, labels).metrics
    assert m["evaluation"] == "cross-validation"
    assert m["folds"] == 4  # min(5, smallest label's 4 images)
    assert m["n_train"] == 55 and m["n_validation"] == 0
    assert m["accuracy"] >= 0.95
    # every image predicted once, by the fold that left it out
    assert np.array(m["confusion"]).sum() == 55
    assert {k: v["support"] for k, v in m["per_label"].items()} == dict(
        zip(NAMES, [9, 12, 4, 30], strict=True)
    )


def test_two_images_per_label_two_folds() -> None:
    vectors, labels = clusters([2, 2, 3])
    m = fit_head(vectors, labels).metrics
    assert m["evaluation"] == "cross-validation" and m["folds"] == 2
    # Inside each fold one image of a label is left: C is not searched there
    # (DEFAULT_C); the final head on every image has two per label to choose it with.
    assert m["C"] in training.C_GRID
    assert m["per_label"]["chat noir"]["support"] == 2


def test_no_search_with_one_image_of_a_label() -> None:
    vectors, labels = clusters([1, 3, 3])
    y = np.array([sorted(set(labels)).index(label) for label in labels])
    assert training._choose_c(vectors.astype(np.float64), y, 3, 0) == training.DEFAULT_C


def test_accuracy_reflects_mixed_labels() -> None:
    """Labels that are noise get chance accuracy: the metrics are not a constant."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((80, 8)).astype(np.float32)
    labels = [f"l{i % 4}" for i in range(80)]
    m = fit_head(vectors, labels).metrics
    assert m["evaluation"] == "validation"
    assert m["accuracy"] < 0.7


def test_folded_head_equals_the_pipeline() -> None:
    """The scaler folded into the weights: the head on raw vectors gives the
    probabilities of the fitted scikit-learn pipeline (standardise, then logistic
    regression) within 1e-5."""
    vectors, labels = clusters([6, 8, 7, 9], spread=1.5)  # overlapping: soft probabilities
    result = fit_head(vectors, labels)
    assert result.metrics["evaluation"] == "cross-validation"  # fitted on every image
    y = np.array([result.classes.index(label) for label in labels])
    pipeline = training.LinearFit(result.metrics["C"]).fit(vectors.astype(np.float64), y)
    expected = pipeline.predict_proba(vectors.astype(np.float64))
    got = head_probabilities(vectors, result.weights, result.bias)
    assert 0.05 < expected.max(axis=1).min() < 0.99  # not all saturated at 0 or 1
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_folded_head_two_labels() -> None:
    """A two-label model has one logit: folded as the logits (0, z)."""
    vectors, labels = clusters([7, 9], spread=2.0)
    result = fit_head(vectors, labels)
    assert result.weights.shape == (16, 2)
    y = np.array([result.classes.index(label) for label in labels])
    pipeline = training.LinearFit(result.metrics["C"]).fit(vectors.astype(np.float64), y)
    np.testing.assert_allclose(
        head_probabilities(vectors, result.weights, result.bias),
        pipeline.predict_proba(vectors.astype(np.float64)),
        atol=1e-5,
        rtol=0,
    )


def test_deterministic_for_a_seed() -> None:
    vectors, labels = clusters([12, 14, 11], spread=1.2)
    first, again = fit_head(vectors, labels, seed=7), fit_head(vectors, labels, seed=7)
    assert summary(first) == summary(again)
    assert np.array_equal(first.weights, again.weights)
    assert np.array_equal(first.bias, again.bias)
    other = fit_head(vectors, labels, seed=8)
    assert other.metrics["n_validation"] == first.metrics["n_validation"]


# --------------------------------------------------------------------------- output
def example_metrics() -> dict[str, Any]:
    vectors, labels = clusters([12, 10, 11, 10], spread=1.3)
    return fit_head(vectors, labels).metrics


def test_format_metrics() -> None:
    metrics = example_metrics()
    text = format_metrics(metrics)
    lines = text.splitlines()
    assert lines[0].startswith(
        f"validation accuracy {metrics['accuracy'] * 100:.1f}% on 9 images held out "
        "(trained on 34, C="
    )
    for name in ["Café crème", "chat noir", "Ωmega"]:
        assert sum(1 for line in lines if line.startswith(name)) == 1  # per-label table
        assert any(line.endswith(tuple("0123456789")) and f". {name}" in line for line in lines)
    # The long label is cut with an ellipsis, the same width in both tables.
    short = ODD_LABEL[:23] + "\u2026"
    assert sum(1 for line in lines if short in line) == 2
    assert ODD_LABEL not in text
    confusion = [line for line in lines if ". " in line and line[:3].strip().rstrip(".").isdigit()]
    assert len(confusion) == 4
    assert [int(v) for v in confusion[0].split()[-4:]] == metrics["confusion"][0]


def test_format_metrics_cross_validation() -> None:
    vectors, labels = clusters([5, 6, 7])
    text = format_metrics(fit_head(vectors, labels).metrics)
    assert text.startswith("cross-validated accuracy ")
    assert "(5-fold, over 18 images: some label has fewer than 10 images" in text


JS_REPORT = """(() => ({
  title: document.title,
  name: document.getElementById('model-name').textContent,
  accuracy: document.getElementById('accuracy').textContent,
  perLabel: [...document.querySelectorAll('#per-label tbody tr')]
    .map(tr => [...tr.children].map(td => td.textContent)),
  rows: [...document.querySelectorAll('#confusion tbody th .lbl')].map(e => e.textContent),
  heads: [...document.querySelectorAll('#confusion thead th[title]')].map(e => e.title),
  cells: [...document.querySelectorAll('#confusion tbody tr')]
    .map(tr => [...tr.querySelectorAll('td.c')].map(td => Number(td.textContent))),
  shaded: [...document.querySelectorAll('#confusion td.d')]
    .map(td => getComputedStyle(td).backgroundColor),
  bold: document.querySelectorAll('b').length,
  scripts: document.scripts.length,
  pwned: window.__pwned === undefined ? null : window.__pwned,
}))()"""


def test_report_in_browser(tmp_path: Path, browser: Browser) -> None:
    metrics = example_metrics()
    out = tmp_path / "report.html"
    write_report(out, "my <model> & co", metrics)
    browser.navigate(out.as_uri(), ready="true")
    state = browser.eval(JS_REPORT)
    classes = sorted(NAMES)
    assert state["title"] == "imgq training: my <model> & co"
    assert state["name"] == "my <model> & co"
    assert state["accuracy"] == f"{metrics['accuracy'] * 100:.1f}%"
    assert [row[0] for row in state["perLabel"]] == classes
    assert state["perLabel"][0][1:] == [
        f"{metrics['per_label'][classes[0]][k]:.2f}" for k in ("precision", "recall", "f1")
    ] + [str(metrics["per_label"][classes[0]]["support"])]
    assert state["rows"] == classes and state["heads"] == classes
    assert state["cells"] == metrics["confusion"]
    # Diagonal cells are shaded by their share of the row (no cell is white when the
    # row is all correct, and the CSP let the stylesheet apply).
    assert all(color != "rgb(255, 255, 255)" for color in state["shaded"])
    assert state["bold"] == 0 and state["scripts"] == 0 and state["pwned"] is None
    assert browser.console == []
    html = out.read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;/style&gt;&lt;script&gt;" in html


def test_the_fit_in_the_span_of_few_vectors_is_the_full_fit() -> None:
    """Fewer vectors than dimensions: logistic regression on their coordinates in their
    span gives the model fitted on every dimension (the representer theorem), here
    with both fits converged tightly."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(5)
    x = rng.standard_normal((24, 300))
    y = np.repeat(np.arange(3), 8)
    x[y == 1, :5] += 1.0
    basis = training._span(x)
    assert basis is not None and basis.shape == (300, 24)
    full = LogisticRegression(C=0.05, tol=1e-10, max_iter=20_000).fit(x, y)
    span = LogisticRegression(C=0.05, tol=1e-10, max_iter=20_000).fit(x @ basis, y)
    probe = rng.standard_normal((10, 300))
    np.testing.assert_allclose(
        span.predict_proba(probe @ basis), full.predict_proba(probe), atol=1e-6, rtol=0
    )
    assert training._span(rng.standard_normal((400, 300))) is None

"""Your own labels: the training set read from a folder or a manifest, and a linear
classifier head fitted on the embedding vectors of its images.

No Redis and no workers here: ``imgq train`` embeds the images through the queue and
hands the vectors to :func:`fit_head`. The head is a multinomial logistic regression
(scikit-learn's lbfgs, its regularisation chosen by cross-validation) on standardised
features, with the scaler folded into its weights, so that applying it needs nothing
but ``softmax(vectors @ weights + bias)`` on the raw vectors.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import time
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from producer.sources import SourceError, iter_manifest_entry, iter_sources
from shared.image_formats import IMAGE_EXTENSIONS
from shared.schemas import ImageRef

__all__ = [
    "MIN_IMAGES_PER_LABEL",
    "MIN_VALIDATION_PER_LABEL",
    "FitResult",
    "TrainingError",
    "TrainingSet",
    "check_labels",
    "fit_head",
    "format_metrics",
    "head_probabilities",
    "read_training_set",
    "split_for_evaluation",
    "write_report",
]

MIN_IMAGES_PER_LABEL = 2
# Every label needs this many images before some are held out for validation: fewer,
# and a validation set of one or two images per label says little, so the estimate
# is cross-validated instead.
MIN_VALIDATION_PER_LABEL = 10
MAX_FOLDS = 5
# C is chosen among these by cross-validation on the training split (accuracy, ties
# to the lower log loss): half decades, wide enough for a few images of a 64-d base
# to 10,000 images of an 8,192-d one (the vectors are centred and scaled to a unit
# mean square first, so C means the same whatever the base's scale).
C_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
SEARCH_FOLDS = 5
DEFAULT_C = 0.01  # a label with a single training image: no folds to choose C with
# lbfgs to a loose tolerance: the accuracy does not move past it, and the fit on
# 10,000 x 2,048 vectors stays within a minute on two cores. The search for C stops
# each fit sooner: it ranks values of C, and a weak penalty on separable few-shot
# vectors would otherwise spend every iteration growing the weights.
MAX_ITER = 300
SEARCH_MAX_ITER = 300
TOL = 1e-3
MANIFEST_SUFFIXES = (".csv", ".jsonl")
_CSV_DELIMITERS = ",;\t|"


class TrainingError(Exception):
    """One line for the user; no model is saved."""


class TrainingUsageError(TrainingError):
    """The command names what cannot be trained on or as (a usage error, exit 2)."""


@dataclass(frozen=True)
class TrainingSet:
    """The images to train on and their labels, in the same order."""

    refs: list[ImageRef]
    labels: list[str]


@dataclass(frozen=True)
class FitResult:
    """A fitted head: ``softmax(vectors @ weights + bias)`` gives the probabilities of
    ``classes`` for raw vectors; ``metrics`` says how well it did (JSON-ready)."""

    classes: list[str]
    weights: np.ndarray
    bias: np.ndarray
    metrics: dict[str, Any]


# --- the training set ----------------------------------------------------------------
def _label(raw: str) -> str:
    """A label as written, NFC-normalised and stripped: a folder name from macOS (NFD)
    and the same name typed into a CSV are one label."""
    return unicodedata.normalize("NFC", raw).strip()


def read_training_set(data: str) -> TrainingSet:
    """The images and labels of ``data``: a folder with one subfolder per label
    (``DATA/afghan_hound/*.jpg``, found recursively as ``imgq submit`` finds images in a
    folder), or a ``.csv`` (header with columns image,label) or ``.jsonl`` (objects with
    "image" and "label") manifest. A manifest's images are any source ``submit`` takes:
    paths relative to the manifest's folder, absolute paths, http(s) and s3:// URLs (a
    folder or a glob gives its label to every image it holds). Image files are not
    opened here: one that cannot be read fails when it is embedded."""
    path = Path(data).expanduser()
    if not path.exists():
        raise TrainingUsageError(f"no such file or folder: {data!r}")
    if path.is_dir():
        return _read_folder(data, path)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return _read_manifest(path)
    raise TrainingError(
        f"{data!r} is neither a folder (one subfolder per label) nor a .csv or .jsonl manifest"
    )


def _read_folder(data: str, folder: Path) -> TrainingSet:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise TrainingError(f"cannot read folder {data!r}: {exc.strerror or exc}") from exc
    refs: list[ImageRef] = []
    labels: list[str] = []
    loose: list[str] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            label = _label(entry.name)
            if not label:
                continue
            try:
                found = list(iter_sources([os.path.join(data, entry.name)]))
            except SourceError as exc:
                raise TrainingError(str(exc)) from exc
            refs.extend(found)
            labels.extend([label] * len(found))
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            loose.append(entry.name)
    if loose:
        raise TrainingError(
            f"{data!r} has images outside a label subfolder ({loose[0]!r}"
            f"{f' and {len(loose) - 1} more' if len(loose) > 1 else ''}): "
            "move each into the subfolder named after its label"
        )
    if not refs:
        raise TrainingError(
            f"{data!r} has no label subfolders with images (expected {data}/<label>/<image>)"
        )
    return TrainingSet(refs=refs, labels=labels)


def _read_manifest(path: Path) -> TrainingSet:
    refs: list[ImageRef] = []
    labels: list[str] = []
    base = str(path.resolve().parent)
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            rows = (
                _csv_rows(path, stream)
                if path.suffix.lower() == ".csv"
                else _jsonl_rows(path, stream)
            )
            for n, image, label in rows:
                try:
                    found = list(iter_manifest_entry(image, base))
                except SourceError as exc:
                    raise TrainingError(f"{path}:{n}: {exc}") from exc
                refs.extend(found)
                labels.extend([label] * len(found))
    except OSError as exc:
        raise TrainingError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TrainingError(f"manifest {path} is not UTF-8 text") from exc
    if not refs:
        raise TrainingError(f"manifest {path} lists no images")
    return TrainingSet(refs=refs, labels=labels)


def _checked(path: Path, n: int, image: Any, label: Any) -> tuple[int, str, str]:
    """One manifest line's image and label, or the line named in a TrainingError."""
    if not isinstance(image, str) or not image.strip():
        raise TrainingError(f"{path}:{n}: no image")
    if not isinstance(label, str):
        raise TrainingError(f"{path}:{n}: no label")
    if not _label(label):
        raise TrainingError(f"{path}:{n}: empty label")
    return n, image.strip(), _label(label)


def _csv_rows(path: Path, stream: TextIO) -> Iterator[tuple[int, str, str]]:
    """(line number, image, label) of each row of a CSV manifest with a header naming
    the columns image and label (any of the delimiters , ; tab |); blank rows skipped."""
    head = list(itertools.islice(stream, 50))
    sample = "".join(line for line in head if line.strip())
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
            sample, delimiters=_CSV_DELIMITERS
        )
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(itertools.chain(head, stream), dialect)
    header: list[str] | None = None
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in row]
            if "image" not in header or "label" not in header:
                raise TrainingError(
                    f"{path}: the header must name the columns image and label "
                    f"(it has {', '.join(row)[:200]})"
                )
            image_at, label_at = header.index("image"), header.index("label")
            continue
        image = row[image_at] if image_at < len(row) else None
        label = row[label_at] if label_at < len(row) else None
        yield _checked(path, reader.line_num, image, label)


def _jsonl_rows(path: Path, stream: TextIO) -> Iterator[tuple[int, str, str]]:
    """(line number, image, label) of each object of a JSON Lines manifest."""
    for n, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingError(f"{path}:{n}: not JSON: {exc.msg}") from exc
        if not isinstance(item, dict):
            raise TrainingError(f'{path}:{n}: expected an object with "image" and "label"')
        yield _checked(path, n, item.get("image"), item.get("label"))


def check_labels(labels: Sequence[str]) -> None:
    """Refuse, in one line, labels no classifier can be trained or evaluated on: fewer
    than two labels, or a label with fewer than two images. Called before the images
    are embedded (no queue time spent on a set that cannot train) and again on the
    images that embedded fine."""
    counts = Counter(labels)
    if not counts:
        raise TrainingError("no images to train on")
    if len(counts) == 1:
        (only,) = counts
        raise TrainingError(
            f"only one label ({only!r}, {_images(counts[only])}): a classifier needs at "
            "least 2 labels"
        )
    few = sorted((n, label) for label, n in counts.items() if n < MIN_IMAGES_PER_LABEL)
    if few:
        shown = ", ".join(f"{label!r} ({_images(n)})" for n, label in few[:5])
        more = f" and {len(few) - 5} more" if len(few) > 5 else ""
        raise TrainingError(
            f"every label needs at least {MIN_IMAGES_PER_LABEL} images: {shown}{more}"
        )


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


# --- the fit --------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """How a head is evaluated: a held-out validation split (``validation`` holds its
    positions, ``train`` the rest) or stratified folds over every image (``folds``)."""

    kind: str  # "validation" | "cross-validation"
    train: np.ndarray
    validation: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]


def split_for_evaluation(y: np.ndarray, *, val_fraction: float, seed: int) -> Evaluation:
    """The evaluation :func:`fit_head` uses for the class indices ``y``: a stratified
    validation split when every label has :data:`MIN_VALIDATION_PER_LABEL` images,
    else stratified k-fold with k = min(5, the smallest label's count), at least 2.
    Public so that a benchmark can compare on the very same split."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    counts = np.bincount(y)
    everything = np.arange(len(y))
    if counts.min() >= MIN_VALIDATION_PER_LABEL:
        train, validation = train_test_split(
            everything, test_size=val_fraction, stratify=y, random_state=seed
        )
        return Evaluation("validation", np.sort(train), np.sort(validation), [])
    k = max(2, min(MAX_FOLDS, int(counts.min())))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = [(tr, te) for tr, te in splitter.split(everything, y)]
    return Evaluation("cross-validation", everything, np.array([], dtype=int), folds)


class LinearFit:
    """Multinomial logistic regression on centred vectors scaled by one factor, fitted
    in the span of its training vectors; :meth:`fold` turns it into a head on raw
    vectors.

    - **One scale for every dimension** (the root mean square of the centred values),
      not one per dimension: the vectors' geometry is the base model's, as a plain
      logistic regression sees it, while C means the same for a 64-d and an 8,192-d
      base. Standardising each dimension from a few dozen images would blow up the
      dimensions that hardly vary, which are mostly noise.
    - **In the span of the training vectors** when there are fewer of them than
      dimensions (the few-shot case): with an L2 penalty the optimal weights are a
      combination of the training vectors (the representer theorem; the intercept is
      not penalised), so the fit on their coordinates in an orthonormal basis of that
      span is the same model, at n x n instead of n x d per step: 40 times less work
      for 50 images of 2,048 dimensions.
    """

    def __init__(self, c: float) -> None:
        self.c = c

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearFit:
        from sklearn.linear_model import LogisticRegression

        self.mean = x.mean(axis=0)
        centred = x - self.mean
        self.scale = float(np.sqrt(np.mean(centred * centred))) or 1.0
        scaled = centred / self.scale
        self.basis = _span(scaled)
        z = scaled if self.basis is None else scaled @ self.basis
        self.model = LogisticRegression(C=self.c, max_iter=MAX_ITER, tol=TOL).fit(z, y)
        return self

    def _z(self, x: np.ndarray) -> np.ndarray:
        scaled = (x - self.mean) / self.scale
        return scaled if self.basis is None else scaled @ self.basis

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities of the classes, as scikit-learn computes them."""
        return np.asarray(self.model.predict_proba(self._z(x)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The most probable class of each row."""
        return np.asarray(self.model.predict(self._z(x)))

    def fold(self, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """The model as one affine map on raw vectors: weights (dim, labels) and bias
        (labels,), float32. A two-class model's single logit becomes the logits (0, z),
        whose softmax is its sigmoid."""
        coef = np.asarray(self.model.coef_, dtype=np.float64)
        intercept = np.asarray(self.model.intercept_, dtype=np.float64)
        if n_classes == 2 and coef.shape[0] == 1:
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        if self.basis is not None:
            coef = coef @ self.basis.T
        weights = coef.T / self.scale
        bias = intercept - self.mean @ weights
        return weights.astype(np.float32), bias.astype(np.float32)


def _span(x: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis (dim x rank) of the rows' span when there are fewer rows than
    dimensions, else None (the fit runs on the vectors themselves)."""
    n, d = x.shape
    if n >= d:
        return None
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    rank = max(1, int(np.sum(singular > singular[0] * 1e-10))) if singular.size else 1
    return np.ascontiguousarray(vt[:rank].T)


def _choose_c(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> float:
    """C by stratified cross-validation on ``x`` (the training split): the best mean
    accuracy, ties to the lower mean log loss.

    The grid is walked from strong to weak regularisation, every fold's lbfgs
    warm-started from its previous C (as LogisticRegressionCV does), in the span of the
    fold's training vectors. The walk stops once two values in a row have done worse
    than the best on both accuracy and log loss: weaker penalties only fit the noise
    further, and on separable few-shot vectors they are the slow fits. Five folds when
    a label has fewer than 20 images (a steadier choice from few), else three."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(y, minlength=n_classes).min())
    folds = min(SEARCH_FOLDS if smallest < 20 else 3, smallest)
    if folds < 2:
        return DEFAULT_C
    centred = x - x.mean(axis=0)
    scaled = centred / (float(np.sqrt(np.mean(centred * centred))) or 1.0)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    prepared = []
    for train, test in splitter.split(scaled, y):
        basis = _span(scaled[train])
        z_train = scaled[train] if basis is None else scaled[train] @ basis
        z_test = scaled[test] if basis is None else scaled[test] @ basis
        model = LogisticRegression(max_iter=SEARCH_MAX_ITER, tol=TOL, warm_start=True)
        prepared.append((model, z_train, y[train], z_test, y[test]))
    scores: list[tuple[float, float]] = []  # (mean accuracy, mean log loss) per C
    worse = 0
    for c in C_GRID:
        accuracy = loss = 0.0
        for model, z_train, y_train, z_test, y_test in prepared:
            model.set_params(C=c)
            model.fit(z_train, y_train)
            proba = model.predict_proba(z_test)
            accuracy += float(np.mean(model.classes_[proba.argmax(axis=1)] == y_test))
            loss += log_loss(y_test, proba, labels=np.arange(n_classes))
        score = (round(accuracy / folds, 9), loss / folds)
        if scores:
            top = min(scores, key=lambda sc: (-sc[0], sc[1]))
            worse = worse + 1 if score[0] < top[0] and score[1] > top[1] else 0
        scores.append(score)
        if worse == 2:
            break
    best = min(range(len(scores)), key=lambda i: (-scores[i][0], scores[i][1]))
    return C_GRID[best]


def _fit(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> tuple[LinearFit, float]:
    """C chosen on ``x``, then the model refitted on all of ``x`` with it."""
    c = _choose_c(x, y, n_classes, seed)
    return LinearFit(c).fit(x, y), c


def head_probabilities(vectors: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``softmax(vectors @ weights + bias)``, row by row: how a head is applied."""
    logits = np.asarray(vectors, dtype=np.float32) @ weights + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


def fit_head(
    vectors: np.ndarray, labels: Sequence[str], *, val_fraction: float = 0.2, seed: int = 0
) -> FitResult:
    """A linear head for ``vectors`` (one row per image) and their ``labels``, with its
    metrics. Evaluation (see :func:`split_for_evaluation`): with 10 images of every
    label, a stratified ``val_fraction`` is held out and the head is fitted on the
    rest; with fewer, accuracy is cross-validated (C chosen again inside each fold,
    so the estimate never saw its own images) and the head is fitted on every image.
    Deterministic for a given ``seed`` (all but ``fit_seconds``)."""
    started = time.perf_counter()
    x = np.asarray(vectors)
    if x.ndim != 2 or len(x) != len(labels):
        raise TrainingError(
            f"expected one vector per label: got vectors of shape {x.shape} for "
            f"{len(labels)} labels"
        )
    if not 0 < val_fraction < 1:
        raise TrainingError(f"the validation fraction must be between 0 and 1, not {val_fraction}")
    check_labels(labels)
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise TrainingError("some vectors hold NaN or infinite values")
    classes = sorted(set(labels))
    index = {label: i for i, label in enumerate(classes)}
    y = np.array([index[label] for label in labels])
    k = len(classes)
    plan = split_for_evaluation(y, val_fraction=val_fraction, seed=seed)
    with warnings.catch_warnings():
        # lbfgs stopping at MAX_ITER on a weak penalty: the grid's other values, or
        # that one's accuracy, say whether it matters; a warning per fit says nothing.
        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", ConvergenceWarning)
        if plan.kind == "validation":
            pipeline, c = _fit(x[plan.train], y[plan.train], k, seed)
            y_true = y[plan.validation]
            y_pred = pipeline.predict(x[plan.validation])
            accuracy = float(np.mean(y_true == y_pred))
        else:
            y_true = y
            y_pred = np.empty_like(y)
            scores = []
            for train, test in plan.folds:
                fold_model, _ = _fit(x[train], y[train], k, seed)
                y_pred[test] = fold_model.predict(x[test])
                scores.append(float(np.mean(y_pred[test] == y[test])))
            accuracy = float(np.mean(scores))
            pipeline, c = _fit(x, y, k, seed)
    weights, bias = pipeline.fold(k)
    metrics = _metrics(plan, classes, y_true, y_pred, accuracy, c, x.shape[1])
    metrics["fit_seconds"] = round(time.perf_counter() - started, 3)
    return FitResult(classes=classes, weights=weights, bias=bias, metrics=metrics)


def _metrics(
    plan: Evaluation,
    classes: list[str],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    accuracy: float,
    c: float,
    dim: int,
) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    everything = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=everything, zero_division=0
    )
    metrics: dict[str, Any] = {
        "evaluation": plan.kind,
        "accuracy": round(accuracy, 6),
        "n_train": len(plan.train),
        "n_validation": len(plan.validation),
    }
    if plan.kind == "cross-validation":
        metrics["folds"] = len(plan.folds)
    metrics.update(
        {
            "C": float(c),
            "classes": list(classes),
            "per_label": {
                label: {
                    "precision": round(float(precision[i]), 6),
                    "recall": round(float(recall[i]), 6),
                    "f1": round(float(f1[i]), 6),
                    "support": int(support[i]),
                }
                for i, label in enumerate(classes)
            },
            "confusion": confusion_matrix(y_true, y_pred, labels=everything).tolist(),
            "dim": int(dim),
        }
    )
    return metrics


# --- what the user sees -------------------------------------------------------------------
NAME_WIDTH = 24


def _short(name: str, width: int = NAME_WIDTH) -> str:
    """A label cut to ``width`` characters, its end replaced by an ellipsis."""
    return name if len(name) <= width else name[: width - 1] + "\u2026"


def accuracy_line(metrics: dict[str, Any]) -> str:
    """The one line that says how good the head is, and how that was measured."""
    pct = f"{metrics['accuracy'] * 100:.1f}%"
    if metrics["evaluation"] == "validation":
        return (
            f"validation accuracy {pct} on {_images(metrics['n_validation'])} held out "
            f"(trained on {metrics['n_train']}, C={metrics['C']:g})"
        )
    return (
        f"cross-validated accuracy {pct} ({metrics['folds']}-fold, over "
        f"{_images(metrics['n_train'])}: some label has fewer than "
        f"{MIN_VALIDATION_PER_LABEL} images to hold any out; C={metrics['C']:g})"
    )


def format_metrics(metrics: dict[str, Any]) -> str:
    """The metrics as the command line prints them: the accuracy line, a per-label
    table, and the confusion matrix (rows numbered and named; columns by number, so
    twenty labels still fit a terminal)."""
    classes: list[str] = metrics["classes"]
    width = max(5, *(len(_short(c)) for c in classes))
    lines = [accuracy_line(metrics), ""]
    lines.append(f"{'label':<{width}}  {'precision':>9}  {'recall':>6}  {'f1':>5}  {'images':>6}")
    for label in classes:
        s = metrics["per_label"][label]
        lines.append(
            f"{_short(label):<{width}}  {s['precision']:>9.2f}  {s['recall']:>6.2f}  "
            f"{s['f1']:>5.2f}  {s['support']:>6}"
        )
    confusion: list[list[int]] = metrics["confusion"]
    tag = len(str(len(classes)))
    cell = max(tag + 1, *(len(str(v)) for row in confusion for v in row))
    lines += ["", "confusion (rows: true label, columns: predicted, numbered as the rows)"]
    head = " " * (tag + 3 + width) + "".join(f" {i + 1:>{cell}}" for i in range(len(classes)))
    lines.append(head)
    for i, (label, row) in enumerate(zip(classes, confusion, strict=True)):
        cells = "".join(f" {v:>{cell}}" for v in row)
        lines.append(f"{i + 1:>{tag}}. {_short(label):<{width}} {cells}")
    return "\n".join(lines)


_TEMPLATE = "training.html.j2"
_STYLE = "training.css"
_SHADES = 10


def write_report(path: Path, name: str, metrics: dict[str, Any]) -> None:
    """A self-contained HTML page of ``metrics`` for the head called ``name``: the
    accuracy, the per-label table and the confusion matrix shaded by row share.
    Autoescaped (label names are user input); no script, and a CSP that allows only
    its own stylesheet."""
    import jinja2
    from markupsafe import Markup

    from producer.report.html import csp_hash, static_text

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("producer.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        keep_trailing_newline=True,
    )
    classes: list[str] = metrics["classes"]
    rows = []
    for i, (label, counts) in enumerate(zip(classes, metrics["confusion"], strict=True)):
        total = sum(counts)
        cells = [
            {
                "count": n,
                # A share of the row, in _SHADES steps: classes, not style attributes,
                # which the CSP would refuse.
                "shade": math.ceil(n / total * _SHADES) if total else 0,
                "diagonal": j == i,
                "title": f"{label} \u2192 {classes[j]}: {n}",
            }
            for j, n in enumerate(counts)
        ]
        rows.append({"label": label, "cells": cells, "total": total})
    css = static_text(_STYLE)
    csp = (
        f"default-src 'none'; img-src data:; style-src {csp_hash(css)}; "
        "base-uri 'none'; form-action 'none'"
    )
    page = env.get_template(_TEMPLATE).render(
        name=name,
        metrics=metrics,
        summary=accuracy_line(metrics),
        per_label=[(label, metrics["per_label"][label]) for label in classes],
        classes=classes,
        rows=rows,
        css=Markup(css),
        csp=Markup(csp),
    )
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)

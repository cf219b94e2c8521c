"""The comparison maths: records grouped per image, classes of two models matched,
and agreement counted. No rendering here; the HTML and PNG writers read its results.

Models with different label sets (ImageNet-1k vs ImageNet-21k) are compared by the
label's first lemma, case-insensitive, falling back to any shared lemma; models
with the same label set are compared by class index.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache

from shared.labels import first_lemma
from shared.registry import ModelSpec
from shared.schemas import Prediction, ResultRecord

__all__ = [
    "DEFAULT_WINDOW",
    "MatchMethod",
    "ModelStats",
    "PairStats",
    "ReportImage",
    "Summary",
    "SummaryBuilder",
    "activation_caption",
    "compare",
    "group_records",
    "image_agreement",
    "iter_images",
    "match_method",
    "match_top5",
    "model_info",
]

# --------------------------------------------------------------------------- grouping


@dataclass
class ReportImage:
    """One image: its source as the user gave it and each model's record."""

    src: str
    records: dict[str, ResultRecord] = field(default_factory=dict)


DEFAULT_WINDOW = 4096


def iter_images(
    records: Iterable[ResultRecord], *, window: int | None = DEFAULT_WINDOW
) -> Iterator[ReportImage]:
    """Records grouped into images as they stream in, yielded in first-seen order.

    At most ``window`` images are open at once: when one more arrives, the oldest
    is yielded and a record for it that comes later starts a new image. Both
    results stores keep an image's records within one chunk's worth of records per
    model (the Redis store chunk by chunk and model by model, PostgreSQL an image's
    records side by side), so a window of the job's chunk size groups every image;
    ``window`` None never lets one go (everything in memory).

    Within the window a later record for the same image and model wins, as in
    :func:`group_records`; the one difference is a source submitted twice at
    positions further apart than the window, which shows as two images.
    """
    if window is not None and window < 1:
        raise ValueError("window must be at least 1")
    open_images: OrderedDict[str, ReportImage] = OrderedDict()
    for record in records:
        image = open_images.get(record.image)
        if image is None:
            if window is not None and len(open_images) >= window:
                yield open_images.popitem(last=False)[1]
            image = open_images[record.image] = ReportImage(src=record.image)
        image.records[record.model] = record
    while open_images:
        yield open_images.popitem(last=False)[1]


def group_records(records: Iterable[ResultRecord]) -> tuple[list[str], list[ReportImage]]:
    """Models and images in first-seen order; a later record for the same pair wins.

    Everything in memory; :func:`iter_images` streams the images instead.
    """
    models: dict[str, None] = {}

    def seen(stream: Iterable[ResultRecord]) -> Iterator[ResultRecord]:
        for record in stream:
            models.setdefault(record.model, None)
            yield record

    images = list(iter_images(seen(records), window=None))
    return list(models), images


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


class SummaryBuilder:
    """The :func:`compare` figures accumulated one image at a time.

    ``add`` each image once, in order; ``result`` gives the same Summary that
    :func:`compare` gives over the same images, holding no image in between.
    """

    def __init__(
        self, models: Sequence[str], *, label_sets: Mapping[str, str] | None = None
    ) -> None:
        self.models = list(models)
        self.images = 0
        self._per_model = {m: ModelStats(model=m) for m in self.models}
        self._pairs = [
            (a, b, _same_set(label_sets, a, b))
            for ia, a in enumerate(self.models)
            for b in self.models[ia + 1 :]
        ]
        n = len(self._pairs)
        self._compared = [0] * n
        self._agree = [0] * n
        self._overlap = [0.0] * n
        self._methods: list[Counter[str]] = [Counter() for _ in range(n)]

    def add(self, image: ReportImage) -> None:
        """Count one image: each model's outcome, and each pair's agreement on it."""
        self.images += 1
        records = image.records
        for m in self.models:
            record = records.get(m)
            stats = self._per_model[m]
            if record is None:
                stats.missing += 1
            elif record.error is not None:
                stats.failed += 1
                code = str(record.error.code)
                stats.errors[code] = stats.errors.get(code, 0) + 1
            else:
                stats.ok += 1
        for k, (a, b, same) in enumerate(self._pairs):
            ra, rb = records.get(a), records.get(b)
            if ra is None or rb is None or not ra.ok or not rb.ok or not ra.top5 or not rb.top5:
                continue
            self._compared[k] += 1
            if match_method(ra.top5[0], rb.top5[0], same_label_set=same) is not None:
                self._agree[k] += 1
            matches = match_top5(ra.top5, rb.top5, same_label_set=same)
            self._overlap[k] += _overlap(len(matches), ra.top5, rb.top5)
            self._methods[k].update(str(method) for _i, _j, method in matches)

    def result(self) -> Summary:
        """The summary of the images added so far."""
        pairs: list[PairStats] = []
        for k, (a, b, same) in enumerate(self._pairs):
            compared, agree, methods = self._compared[k], self._agree[k], self._methods[k]
            pairs.append(
                PairStats(
                    model_a=a,
                    model_b=b,
                    compared=compared,
                    top1_agree=agree,
                    top1_agreement=agree / compared if compared else None,
                    mean_top5_overlap=self._overlap[k] / compared if compared else None,
                    same_label_set=same,
                    methods={str(m): methods[str(m)] for m in MatchMethod if methods[str(m)]},
                )
            )
        per_model = {
            m: ModelStats(
                model=m,
                ok=st.ok,
                failed=st.failed,
                missing=st.missing,
                errors=dict(st.errors),
            )
            for m, st in self._per_model.items()
        }
        return Summary(
            images=self.images,
            models=list(self.models),
            failures={m: per_model[m].failed for m in self.models},
            per_model=per_model,
            pairs=pairs,
        )


def compare(
    models: Sequence[str],
    images: Iterable[ReportImage],
    *,
    label_sets: Mapping[str, str] | None = None,
) -> Summary:
    """Failures per model and, per pair of models, top-1 agreement and mean top-5 overlap."""
    builder = SummaryBuilder(models, label_sets=label_sets)
    for image in images:
        builder.add(image)
    return builder.result()


def image_agreement(
    models: Sequence[str], image: ReportImage, label_sets: Mapping[str, str] | None
) -> tuple[bool | None, dict[str, set[int]]]:
    """Whether the models' top-1 classes agree (None under two) and each one's matched places."""
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
    return agree, matched


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

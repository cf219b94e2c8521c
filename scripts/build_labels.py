#!/usr/bin/env python3
"""Build imgq's built-in ImageNet label sets from the data files in the ``timm`` wheel.

The ``timm`` wheel carries the ImageNet synset lists (WordNet ids, "wnids") and a
wnid -> lemma table. This script reads them straight out of the wheel (a zip file;
timm itself is never installed or imported) and writes, one label per line:

* ``imagenet1k.txt``            1000 labels, standard ImageNet-1k order;
* ``imagenet1k-background.txt`` 1001 labels, "background" then the 1000
  (TF Hub's order for 1001-logit classifiers);
* ``imagenet21k.txt``           21,843 labels, Google's ImageNet-21k order (BiT's order);
* ``SOURCES.md``                where the data comes from and how to regenerate it.

The only network access is ``pip download`` from the package index, and only when
``--timm-wheel`` is not given.

Usage::

    python scripts/build_labels.py                       # downloads the pinned timm wheel
    python scripts/build_labels.py --timm-wheel timm-1.0.31-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_TIMM_REQUIREMENT = "timm==1.0.31"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "labels"

INFO_DIR = "timm/data/_info"
SYNSETS_1K = f"{INFO_DIR}/imagenet_synsets.txt"
SYNSETS_21K = f"{INFO_DIR}/imagenet21k_goog_synsets.txt"
SYNSET_TO_LEMMA = f"{INFO_DIR}/imagenet_synset_to_lemma.txt"

EXPECTED_1K = 1000
EXPECTED_21K = 21_843
BACKGROUND_LABEL = "background"


class BuildError(RuntimeError):
    """The wheel's data is missing or not in the expected shape."""


def download_timm_wheel(requirement: str, dest: Path) -> Path:
    """Download the timm wheel (no dependencies) into ``dest`` with pip and return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        requirement,
    ]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("timm-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one timm wheel in {dest}, found {len(wheels)}")
    return wheels[0]


def read_member(wheel: zipfile.ZipFile, name: str) -> str:
    """Return one file of the wheel decoded as UTF-8."""
    try:
        data = wheel.read(name)
    except KeyError as exc:
        raise BuildError(f"{name} is not in the wheel") from exc
    return data.decode("utf-8")


def parse_synsets(text: str, expected: int, what: str) -> list[str]:
    """Parse a one-wnid-per-line list and check its length and uniqueness."""
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    if len(wnids) != expected:
        raise BuildError(f"{what}: expected {expected} wnids, found {len(wnids)}")
    if len(set(wnids)) != len(wnids):
        raise BuildError(f"{what}: duplicate wnids")
    return wnids


def parse_lemmas(text: str) -> dict[str, str]:
    """Parse the tab-separated ``wnid<TAB>lemma1, lemma2`` table."""
    lemmas: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        wnid, sep, lemma = line.partition("\t")
        lemma = lemma.strip()
        if not sep or not lemma:
            raise BuildError(f"{SYNSET_TO_LEMMA}:{lineno}: malformed line {line!r}")
        lemmas[wnid.strip()] = lemma
    return lemmas


def to_labels(wnids: Sequence[str], lemmas: dict[str, str], what: str) -> list[str]:
    """Map wnids to their lemma text, failing on any wnid without one."""
    missing = [w for w in wnids if w not in lemmas]
    if missing:
        raise BuildError(f"{what}: {len(missing)} wnids have no lemma, e.g. {missing[:5]}")
    return [lemmas[w] for w in wnids]


def write_labels(path: Path, labels: Sequence[str]) -> None:
    """Write labels one per line, UTF-8, ending with a newline."""
    for label in labels:
        if not label or "\n" in label or "\r" in label:
            raise BuildError(f"{path.name}: bad label {label!r}")
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8", newline="\n")


def data_notes(wnids_1k: Sequence[str], wnids_21k: Sequence[str], lemmas: dict[str, str]) -> str:
    """Describe the data's quirks: 1k synsets missing from 21k, repeated 1k label texts."""
    in_21k = set(wnids_21k)
    notes: list[str] = []
    for index, wnid in enumerate(wnids_1k):
        if wnid not in in_21k:
            notes.append(
                f"- 1k synset `{wnid}` (`{lemmas[wnid]}`, index {index}) is not in the 21k set."
            )
    by_label: dict[str, list[int]] = {}
    for index, wnid in enumerate(wnids_1k):
        by_label.setdefault(lemmas[wnid], []).append(index)
    for label, indices in by_label.items():
        if len(indices) > 1:
            where = ", ".join(f"{i} (`{wnids_1k[i]}`)" for i in indices)
            notes.append(f"- 1k label `{label}` is used by more than one synset: indices {where}.")
    return "\n".join(notes) if notes else "- None."


def sources_markdown(wheel_name: str, wheel_sha256: str, counts: dict[str, int], notes: str) -> str:
    """Return the text of SOURCES.md."""
    rows = "\n".join(f"| `{name}` | {count:,} |" for name, count in counts.items())
    return f"""\
# ImageNet label sets: sources

These files are generated; do not edit them by hand.

| File | Labels |
| --- | ---: |
{rows}

Each line is the WordNet lemma text of one synset (e.g. `tabby, tabby cat`).

- `imagenet1k.txt`: the 1000 ImageNet-1k (ILSVRC-2012) synsets in the standard
  (sorted-wnid) order that 1000-logit classifiers use.
- `imagenet1k-background.txt`: `background` followed by the 1000 above; the order
  of TF Hub's 1001-logit ImageNet classifiers (e.g. `tensorflow/resnet_50/classification/1`).
- `imagenet21k.txt`: the 21,843 ImageNet-21k synsets in Google's order, the order
  used by BiT and other TF Hub ImageNet-21k classifiers (index 0 is `organism, being`).

## Source

The data files of the [timm](https://pypi.org/project/timm/) wheel (Apache-2.0),
read from the wheel as a zip archive; timm is not installed or imported:

- `{SYNSETS_1K}`: the 1k wnids, in order;
- `{SYNSETS_21K}`: the 21k wnids, in order;
- `{SYNSET_TO_LEMMA}`: wnid -> lemma text.

Wheel used: `{wheel_name}` (sha256 `{wheel_sha256}`).

## Data notes

{notes}

## Regenerate

From the repository root:

```
python scripts/build_labels.py
```

This runs `pip download --no-deps {DEFAULT_TIMM_REQUIREMENT}` into a temporary
directory (the only network access). To use a wheel you already have:

```
python scripts/build_labels.py --timm-wheel path/to/{wheel_name}
```
"""


def build(wheel_path: Path, out_dir: Path) -> dict[str, int]:
    """Read the wheel, write the label files and SOURCES.md, and return label counts."""
    with zipfile.ZipFile(wheel_path) as wheel:
        wnids_1k = parse_synsets(read_member(wheel, SYNSETS_1K), EXPECTED_1K, SYNSETS_1K)
        wnids_21k = parse_synsets(read_member(wheel, SYNSETS_21K), EXPECTED_21K, SYNSETS_21K)
        lemmas = parse_lemmas(read_member(wheel, SYNSET_TO_LEMMA))

    labels_1k = to_labels(wnids_1k, lemmas, SYNSETS_1K)
    label_sets = {
        "imagenet1k.txt": labels_1k,
        "imagenet1k-background.txt": [BACKGROUND_LABEL, *labels_1k],
        "imagenet21k.txt": to_labels(wnids_21k, lemmas, SYNSETS_21K),
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, labels in label_sets.items():
        write_labels(out_dir / name, labels)

    counts = {name: len(labels) for name, labels in label_sets.items()}
    sha256 = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
    (out_dir / "SOURCES.md").write_text(
        sources_markdown(wheel_path.name, sha256, counts, data_notes(wnids_1k, wnids_21k, lemmas)),
        encoding="utf-8",
        newline="\n",
    )
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Build imgq's ImageNet label sets from the data files in the timm wheel.",
    )
    parser.add_argument(
        "--timm-wheel",
        type=Path,
        default=None,
        help="a timm wheel already on disk (default: download one with pip)",
    )
    parser.add_argument(
        "--timm",
        default=DEFAULT_TIMM_REQUIREMENT,
        metavar="REQUIREMENT",
        help=f"what pip downloads without --timm-wheel (default: {DEFAULT_TIMM_REQUIREMENT})",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="where to write the label files (default: shared/data/labels in this repository)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: build the label sets and print what was written."""
    args = parse_args(argv)
    try:
        if args.timm_wheel is not None:
            counts = build(args.timm_wheel, args.out_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="imgq-timm-") as tmp:
                counts = build(download_timm_wheel(args.timm, Path(tmp)), args.out_dir)
    except (BuildError, OSError, zipfile.BadZipFile, subprocess.CalledProcessError) as exc:
        print(f"build_labels: error: {exc}", file=sys.stderr)
        return 1
    for name, count in counts.items():
        print(f"wrote {args.out_dir / name} ({count} labels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

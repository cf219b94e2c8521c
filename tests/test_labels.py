"""Tests for shared.labels and the built-in ImageNet label sets it ships."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest

from shared.labels import BUILTIN_LABEL_SETS, LabelSetError, first_lemma, load_labels

# --- the built-in label sets ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count"),
    [("imagenet1k", 1000), ("imagenet1k-background", 1001), ("imagenet21k", 21_843)],
)
def test_builtin_counts(name: str, count: int) -> None:
    assert len(load_labels(name)) == count


def test_builtin_names_constant() -> None:
    assert BUILTIN_LABEL_SETS == ("imagenet1k", "imagenet1k-background", "imagenet21k")


@pytest.mark.parametrize("name", BUILTIN_LABEL_SETS)
def test_builtin_files_are_clean(name: str) -> None:
    raw = (importlib.resources.files("shared") / "data" / "labels" / f"{name}.txt").read_bytes()
    text = raw.decode("utf-8")
    assert text.endswith("\n")
    assert not text.endswith("\n\n")
    assert "\r" not in text
    assert not text.startswith("\ufeff")
    lines = text.split("\n")[:-1]
    assert tuple(lines) == load_labels(name)
    assert all(line and line == line.strip() for line in lines)


def test_imagenet1k_known_indices() -> None:
    labels = load_labels("imagenet1k")
    assert labels[0] == "tench, Tinca tinca"
    assert labels[281] == "tabby, tabby cat"
    assert labels[281].startswith("tabby")
    assert labels[999] == "toilet tissue, toilet paper, bathroom tissue"


def test_imagenet1k_background_order() -> None:
    labels = load_labels("imagenet1k-background")
    assert labels[0] == "background"
    assert labels[282].startswith("tabby")
    assert labels[1:] == load_labels("imagenet1k")


def test_imagenet21k_known_indices() -> None:
    labels = load_labels("imagenet21k")
    assert labels[0] == "organism, being"
    assert labels[1] == "benthos"
    assert labels[-1] == "knothole"


def test_imagenet1k_labels_in_imagenet21k() -> None:
    # Measured: 999 of the 1000 1k synsets are in Google's 21k list; the one that is
    # not is n04399382 "teddy, teddy bear" (1k index 850).
    in_21k = set(load_labels("imagenet21k"))
    labels_1k = load_labels("imagenet1k")
    missing = [label for label in labels_1k if label not in in_21k]
    assert missing == ["teddy, teddy bear"]
    assert labels_1k.index("teddy, teddy bear") == 850
    assert sum(label in in_21k for label in labels_1k) >= 999


def test_imagenet1k_duplicate_label_text() -> None:
    # Two distinct synsets (the bird n02012849 and the machine n03126707) share "crane".
    labels = load_labels("imagenet1k")
    assert [i for i, label in enumerate(labels) if label == "crane"] == [134, 517]
    assert len(set(labels)) == 999


def test_builtin_is_cached() -> None:
    assert load_labels("imagenet21k") is load_labels("imagenet21k")


# --- custom label files -----------------------------------------------------


def test_custom_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("cat\ndog\n  bird  \n\n\n", encoding="utf-8")
    assert load_labels(str(path)) == ("cat", "dog", "bird")


def test_custom_no_trailing_newline_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes("\ufeffcafé\r\nnaïve".encode())
    assert load_labels(str(path)) == ("café", "naïve")


def test_custom_relative_path_with_base_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "config"
    (config_dir / "labels").mkdir(parents=True)
    (config_dir / "labels" / "flowers.txt").write_text("daisy\nrose\ntulip\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_labels("labels/flowers.txt", base_dir=config_dir) == ("daisy", "rose", "tulip")
    with pytest.raises(LabelSetError):
        load_labels("labels/flowers.txt")  # resolved against cwd, where it is not


def test_custom_relative_path_without_base_dir_uses_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "here.txt").write_text("a\nb\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_labels("here.txt") == ("a", "b")


def test_custom_is_cached_by_resolved_path(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("x\ny\n", encoding="utf-8")
    first = load_labels("c.txt", base_dir=tmp_path)
    assert load_labels(str(path)) is first
    assert load_labels("./sub/../c.txt", base_dir=tmp_path) is first


def test_builtin_name_wins_over_base_dir(tmp_path: Path) -> None:
    (tmp_path / "imagenet1k").write_text("not\nimagenet\n", encoding="utf-8")
    assert len(load_labels("imagenet1k", base_dir=tmp_path)) == 1000


# --- errors -------------------------------------------------------------------


def _assert_names_builtins(message: str) -> None:
    for name in BUILTIN_LABEL_SETS:
        assert name in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LabelSetError) as info:
        load_labels("nope.txt", base_dir=tmp_path)
    message = str(info.value)
    assert "'nope.txt'" in message
    assert str(tmp_path / "nope.txt") in message
    _assert_names_builtins(message)


def test_unknown_name_is_a_missing_file() -> None:
    with pytest.raises(LabelSetError, match="imagenet-1k"):
        load_labels("imagenet-1k")


@pytest.mark.parametrize("content", ["", "\n", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LabelSetError, match="no labels") as info:
        load_labels(str(path))
    _assert_names_builtins(str(info.value))


def test_blank_line_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "gap.txt"
    path.write_text("a\n\nb\n", encoding="utf-8")
    with pytest.raises(LabelSetError, match="line 2"):
        load_labels(str(path))


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LabelSetError, match="not a file"):
        load_labels(str(tmp_path))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(LabelSetError, match="UTF-8"):
        load_labels(str(path))


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec(spec: str) -> None:
    with pytest.raises(LabelSetError, match="empty"):
        load_labels(spec)


def test_label_set_error_is_value_error() -> None:
    assert issubclass(LabelSetError, ValueError)


# --- first_lemma -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("tabby, tabby cat", "tabby"),
        ("tench, Tinca tinca", "tench"),
        ("Granny Smith", "granny smith"),
        ("  Crane  ", "crane"),
        ("background", "background"),
        ("a, b, c", "a"),
        ("", ""),
    ],
)
def test_first_lemma(label: str, expected: str) -> None:
    assert first_lemma(label) == expected


def test_first_lemma_matches_across_label_sets() -> None:
    lemmas_21k = {first_lemma(label) for label in load_labels("imagenet21k")}
    assert first_lemma(load_labels("imagenet1k")[281]) in lemmas_21k
    assert first_lemma(load_labels("imagenet1k-background")[282]) == "tabby"

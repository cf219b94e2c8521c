"""Sources: files, folders, globs, manifests and URLs become image references."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from producer.sources import SourceError, expand_sources


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "photos" / "b").mkdir(parents=True)
    for name in ("photos/a.jpg", "photos/b/c.PNG", "photos/b/d.txt", "photos/e.jpeg", "x.gif"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def srcs(refs: list) -> list[str]:
    return [r.src for r in refs]


def test_folder_is_recursive_sorted_and_by_extension(tree: Path) -> None:
    refs = expand_sources(["photos"], cwd=tree)
    assert srcs(refs) == ["photos/a.jpg", "photos/b/c.PNG", "photos/e.jpeg"]
    assert all(os.path.isabs(r.ref) for r in refs)
    assert refs[1].ref == str(tree / "photos" / "b" / "c.PNG")


def test_files_keep_what_the_user_typed_and_travel_absolute(tree: Path) -> None:
    refs = expand_sources(["x.gif", "missing.jpg", str(tree / "photos" / "a.jpg")], cwd=tree)
    assert srcs(refs) == ["x.gif", "missing.jpg", str(tree / "photos" / "a.jpg")]
    assert refs[1].ref == str(tree / "missing.jpg")  # the worker answers not_found


def test_globs(tree: Path) -> None:
    refs = expand_sources(["photos/**/*.*"], cwd=tree)
    assert srcs(refs) == ["photos/a.jpg", "photos/b/c.PNG", "photos/e.jpeg"]
    with pytest.raises(SourceError, match="no file matches"):
        expand_sources(["nothing/*.jpg"], cwd=tree)


def test_urls_pass_through() -> None:
    refs = expand_sources(["https://example.com/cat.jpg", "ftp://h/x.png"])
    assert [(r.src, r.ref) for r in refs] == [
        ("https://example.com/cat.jpg", "https://example.com/cat.jpg"),
        ("ftp://h/x.png", "ftp://h/x.png"),
    ]


def test_text_manifest_paths_relative_to_it(tree: Path) -> None:
    (tree / "lists").mkdir()
    (tree / "lists" / "l.txt").write_text(
        "# a comment\n../photos/a.jpg\n\nhttps://h/x.jpg\n../photos\n", encoding="utf-8"
    )
    refs = expand_sources(["@lists/l.txt"], cwd=tree)
    assert srcs(refs) == ["../photos/a.jpg", "https://h/x.jpg", "../photos"]
    assert refs[0].ref == str(tree / "photos" / "a.jpg")
    # A folder inside a manifest is one entry; the worker answers is_directory.
    assert refs[2].ref == str(tree / "photos")


def test_csv_and_jsonl_manifests(tree: Path) -> None:
    (tree / "m.csv").write_text("id,path\n1,photos/a.jpg\n2,x.gif\n", encoding="utf-8")
    assert srcs(expand_sources(["m.csv"], cwd=tree)) == ["photos/a.jpg", "x.gif"]
    (tree / "n.csv").write_text("photos/a.jpg\nx.gif\n", encoding="utf-8")
    assert srcs(expand_sources(["@n.csv"], cwd=tree)) == ["photos/a.jpg", "x.gif"]
    lines = [json.dumps("x.gif"), json.dumps({"url": "https://h/y.png", "id": 3}), ""]
    (tree / "m.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert srcs(expand_sources(["m.jsonl"], cwd=tree)) == ["x.gif", "https://h/y.png"]
    (tree / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"bad\.jsonl:1"):
        expand_sources(["bad.jsonl"], cwd=tree)
    (tree / "bad2.jsonl").write_text('{"id": 1}\n', encoding="utf-8")
    with pytest.raises(SourceError, match="no image"):
        expand_sources(["bad2.jsonl"], cwd=tree)


def test_missing_manifest(tree: Path) -> None:
    with pytest.raises(SourceError, match="cannot read manifest"):
        expand_sources(["@nope.txt"], cwd=tree)

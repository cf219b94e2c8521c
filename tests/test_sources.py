"""Sources: files, folders, globs, manifests and URLs become image references."""

from __future__ import annotations

import json
import os
import shutil
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
    assert refs[0].ref == str(tree / "photos" / "a.jpg")
    # A folder in a manifest is walked, as on the command line (and as a glob line is).
    assert srcs(refs) == [
        "../photos/a.jpg",
        "https://h/x.jpg",
        "../photos/a.jpg",
        "../photos/b/c.PNG",
        "../photos/e.jpeg",
    ]
    (tree / "lists" / "g.txt").write_text("../photos/*.jpg\n", encoding="utf-8")
    assert srcs(expand_sources(["@lists/g.txt"], cwd=tree)) == ["../photos/a.jpg"]


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


def test_csv_manifests_sniffed_blank_lines_skipped_no_column_refused(tree: Path) -> None:
    # Semicolons, a blank line inside and at the end, a BOM and CRLF line ends.
    (tree / "semi.csv").write_text(
        "\ufeffid;path\r\n1;photos/a.jpg\r\n\r\n2;x.gif\r\n\r\n", encoding="utf-8"
    )
    assert srcs(expand_sources(["semi.csv"], cwd=tree)) == ["photos/a.jpg", "x.gif"]
    (tree / "tabs.csv").write_text("url\tlabel\nhttps://h/y.png\tcat\n", encoding="utf-8")
    assert srcs(expand_sources(["tabs.csv"], cwd=tree)) == ["https://h/y.png"]
    (tree / "blank.csv").write_text("image\nphotos/a.jpg\n\n\nx.gif\n\n", encoding="utf-8")
    assert srcs(expand_sources(["blank.csv"], cwd=tree)) == ["photos/a.jpg", "x.gif"]
    # No recognisable column: refused in one line, the header never becomes an image.
    (tree / "nocol.csv").write_text("id,name\n1,photos/a.jpg\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"nocol\.csv: no column named image, path, url"):
        expand_sources(["nocol.csv"], cwd=tree)
    (tree / "word.csv").write_text("filename\nphotos/a.jpg\n", encoding="utf-8")
    with pytest.raises(SourceError, match="no column named"):
        expand_sources(["word.csv"], cwd=tree)


def test_folders_find_every_extension_the_decoder_reads(tmp_path: Path) -> None:
    from PIL import Image

    from shared.image_formats import IMAGE_EXTENSIONS, IMAGE_FORMATS
    from workers.inputs.decode import SUPPORTED_FORMATS

    names = ["a.avif", "b.ico", "c.jfif", "d.JPG", "e.webp", "f.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert srcs(expand_sources([str(tmp_path)])) == [str(tmp_path / n) for n in names[:5]]
    # One list: every extension Pillow gives a format the decoder opens is picked up.
    assert tuple(IMAGE_FORMATS) == SUPPORTED_FORMATS
    Image.init()
    readable = {e for e, f in Image.registered_extensions().items() if f in SUPPORTED_FORMATS}
    assert readable <= IMAGE_EXTENSIONS


def test_a_text_file_named_without_at_gets_a_hint(tree: Path) -> None:
    (tree / "list.txt").write_text("photos/a.jpg\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"name it @list\.txt"):
        expand_sources(["list.txt"], cwd=tree)
    assert srcs(expand_sources(["@list.txt"], cwd=tree)) == ["photos/a.jpg"]


def test_missing_sources_are_the_local_paths_that_do_not_exist(tree: Path) -> None:
    from producer.sources import missing_sources

    typed = ["photos", "phtos", "photos/a.jpg", "nope.jpg", "https://h/x.jpg", "@l.txt", "*.png"]
    assert missing_sources(typed, cwd=tree) == ["phtos", "nope.jpg"]


def test_a_manifest_is_read_as_it_is_written(tmp_path: Path) -> None:
    """References come out while the manifest is still being written (a named pipe):
    a manifest of ten million lines is never in memory at once."""
    import threading

    from producer.sources import iter_sources

    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)
    more = threading.Event()

    def write() -> None:
        with open(fifo, "w", encoding="utf-8") as fh:
            fh.write("/data/a.jpg\n")
            fh.flush()
            more.wait(10)
            fh.write("/data/b.jpg\n")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        found = iter_sources([f"@{fifo}"])
        assert next(found).ref == "/data/a.jpg"  # before the writer has finished
        more.set()
        assert [r.ref for r in found] == ["/data/b.jpg"]
    finally:
        more.set()
        writer.join(10)


def test_folders_are_walked_in_path_order_and_a_vanished_one_is_an_error(tmp_path: Path) -> None:
    from producer.sources import iter_sources

    for name in ("a.jpg", "a/x.jpg", "a0.jpg", "a-b.jpg", "b/c/d.png", "b/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    os.symlink(tmp_path / "b", tmp_path / "link")  # links to folders are not followed
    refs = expand_sources([str(tmp_path)])
    paths = [r.ref for r in refs]
    assert paths == sorted(paths) and len(paths) == 5
    assert [r.src for r in refs] == [
        str(tmp_path / n) for n in ("a-b.jpg", "a.jpg", "a/x.jpg", "a0.jpg", "b/c/d.png")
    ]
    found = iter_sources([str(tmp_path)])
    assert next(found).src.endswith("a-b.jpg")
    shutil.rmtree(tmp_path / "b")  # vanishes while the walk goes on
    with pytest.raises(SourceError, match=r"cannot read folder .*b"):
        list(found)

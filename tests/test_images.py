"""The image input layer: reading paths and URLs, decoding every awkward image, the limits."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from shared.schemas import ErrorCode
from shared.settings import Settings
from tests.corpus import (
    BOMB_SIDE,
    LARGE_SIZE,
    animated_gif,
    bomb_png,
    build_bad_corpus,
    build_good_photos,
    corner_marked,
    encode,
    exif_bytes,
    mutated_images,
    noise_rgb,
)
from workers.inputs import ImageError, ReadLimits, read_source
from workers.inputs import decode_image as decode_uint8
from workers.inputs import load_image as load_uint8
from workers.runtimes.base import to_unit

SIZE = (224, 224)
MAX_PIXELS = 89_478_485
LIMITS = ReadLimits(
    allowed_roots=(),
    max_bytes=50 * 1024 * 1024,
    max_pixels=MAX_PIXELS,
    fetch_timeout=5.0,
    max_redirects=5,
    allow_private_urls=False,
)
RED = np.array([1.0, 0.0, 0.0], dtype=np.float32)
BLUE = np.array([0.0, 0.0, 1.0], dtype=np.float32)
WHITE = np.ones(3, dtype=np.float32)


def decode_image(*args: Any, **kwargs: Any) -> np.ndarray:
    """The decoder's uint8 pixels, scaled to [0, 1] as the model runtimes do."""
    array = decode_uint8(*args, **kwargs)
    assert array.dtype == np.uint8
    return to_unit(array)


def load_image(*args: Any, **kwargs: Any) -> np.ndarray:
    """load_image's uint8 pixels, scaled to [0, 1] as the model runtimes do."""
    array = load_uint8(*args, **kwargs)
    assert array.dtype == np.uint8
    return to_unit(array)


def raises(code: ErrorCode, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ImageError:
    """Call fn and check it raises ImageError with code; the error."""
    with pytest.raises(ImageError) as info:
        fn(*args, **kwargs)
    assert info.value.code is code, info.value.message
    assert info.value.message and str(info.value) == info.value.message
    return info.value


def assert_image(array: np.ndarray, height: int, width: int) -> None:
    """A decoded image (scaled by decode_image above): float32, (height, width, 3), in [0, 1]."""
    assert array.dtype == np.float32
    assert array.shape == (height, width, 3)
    assert np.isfinite(array).all()
    assert array.min() >= 0.0 and array.max() <= 1.0


def native(data: bytes) -> np.ndarray:
    """Decode at the image's own (upright) size: no resampling, pixels as they are."""
    with Image.open(io.BytesIO(data)) as im:
        width, height = ImageOps.exif_transpose(im).size
    return decode_image(data, (height, width), max_pixels=MAX_PIXELS)


# ----------------------------------------------------------------------------- corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    """The generated corpus, written once for the module."""
    folder = tmp_path_factory.mktemp("corpus")
    return folder, build_bad_corpus(folder)


def test_corpus_has_every_case(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, expected = corpus
    for name in (
        "empty.jpg",
        "text.jpg",
        "truncated.jpg",
        "truncated.png",
        "cmyk.jpg",
        "gray16.png",
        "palette.png",
        "rgba.png",
        "gray.jpg",
        "animated.gif",
        "exif_rotated.jpg",
        "one_pixel.png",
        "bomb.png",
        "large.jpg",
        "dir.jpg",
        "missing.jpg",
    ):
        assert name in expected
    assert (folder / "dir.jpg").is_dir()
    assert not (folder / "missing.jpg").exists()
    assert (folder / "bomb.png").stat().st_size < 200_000
    assert all(value is None or ErrorCode(value) for value in expected.values())


def test_corpus_outcomes(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, expected = corpus
    outcomes: dict[str, str | None] = {}
    for name in expected:
        try:
            array = load_image(str(folder / name), SIZE, LIMITS)
        except ImageError as exc:
            assert exc.message
            outcomes[name] = exc.code.value
        else:
            assert_image(array, *SIZE)
            assert array.std() > 0 or name == "one_pixel.png", name
            outcomes[name] = None
    assert outcomes == expected


def test_corpus_through_file_urls(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, expected = corpus
    for name in ("truncated.jpg", "cmyk.jpg", "dir.jpg", "missing.jpg"):
        try:
            load_image((folder / name).as_uri(), (32, 32), LIMITS)
            got = None
        except ImageError as exc:
            got = exc.code.value
        assert got == expected[name], name


def test_decompression_bomb_checked_before_decoding() -> None:
    header_only = bomb_png(1000)[:60]  # signature, IHDR, the start of IDAT: no pixel data
    error = raises(
        ErrorCode.DECOMPRESSION_BOMB, decode_image, header_only, SIZE, max_pixels=999_999
    )
    assert "1000x1000" in error.message and "IMGQ_MAX_IMAGE_PIXELS" in error.message
    big = bomb_png(BOMB_SIDE)
    error = raises(ErrorCode.DECOMPRESSION_BOMB, decode_image, big, SIZE, max_pixels=MAX_PIXELS)
    assert "IMGQ_MAX_IMAGE_PIXELS" in error.message


def test_small_max_pixels_refuses_large_photo(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = corpus
    limits = replace(LIMITS, max_pixels=1_000_000)
    error = raises(
        ErrorCode.DECOMPRESSION_BOMB, load_image, str(folder / "large.jpg"), SIZE, limits
    )
    assert f"{LARGE_SIZE[0]}x{LARGE_SIZE[1]}" in error.message
    one = load_image(str(folder / "one_pixel.png"), SIZE, replace(LIMITS, max_pixels=1))
    assert_image(one, *SIZE)


# ------------------------------------------------------------------------- decoding


def test_exif_orientation_6_rotates(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = corpus
    data = (folder / "exif_rotated.jpg").read_bytes()  # stored 60 wide x 40 high, red top-left
    upright = decode_image(data, (60, 40), max_pixels=MAX_PIXELS)  # shown 40 wide x 60 high
    assert_image(upright, 60, 40)
    # Orientation 6: the stored top-left corner is shown at the top right.
    assert np.abs(upright[5, 35] - RED).max() < 0.15
    assert np.abs(upright[5, 4] - BLUE).max() < 0.15
    assert np.abs(upright[55, 35] - BLUE).max() < 0.15
    small = decode_image(data, (30, 20), max_pixels=MAX_PIXELS)
    assert_image(small, 30, 20)
    assert np.abs(small[2, 18] - RED).max() < 0.2 and np.abs(small[2, 1] - BLUE).max() < 0.2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(orientation: int) -> None:
    data = encode(corner_marked(30, 20), "PNG", exif=exif_bytes(orientation))
    with Image.open(io.BytesIO(data)) as im:
        reference = ImageOps.exif_transpose(im).convert("RGB")
    width, height = reference.size
    assert (width, height) == ((20, 30) if orientation >= 5 else (30, 20))
    got = decode_image(data, (height, width), max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(got, np.asarray(reference, dtype=np.float32) / 255)
    resized = decode_image(data, (13, 17), max_pixels=MAX_PIXELS)
    want = np.asarray(reference.resize((17, 13), Image.Resampling.BILINEAR), np.float32) / 255
    assert np.abs(resized - want).max() <= 2 / 255


def test_broken_exif_is_ignored() -> None:
    rgb = Image.fromarray(noise_rgb(20, 30))
    data = bytearray(encode(rgb, "JPEG", exif=exif_bytes(6)))
    start = data.index(b"Exif\x00\x00")
    data[start + 6 : start + 14] = b"XXXXXXXX"  # the TIFF header of the EXIF block
    assert_image(decode_image(bytes(data), (20, 30), max_pixels=MAX_PIXELS), 20, 30)


def test_16bit_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535], [128, 65278, 1000, 30000]], dtype=np.uint16)
    want = np.rint(values / 257.0) / 255.0
    for fmt, array in (
        ("PNG", values),
        ("TIFF", values.astype(">u2")),
        ("TIFF", values.astype(np.int32)),
    ):
        data = encode(Image.fromarray(array), fmt)
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
        got = decode_image(data, (2, 4), max_pixels=MAX_PIXELS)
        assert_image(got, 2, 4)
        for channel in range(3):
            np.testing.assert_allclose(got[..., channel], want, atol=1e-6, err_msg=mode)
    seen = {
        Image.open(io.BytesIO(encode(Image.fromarray(a), f))).mode
        for f, a in (
            ("PNG", values),
            ("TIFF", values.astype(">u2")),
            ("TIFF", values.astype(np.int32)),
        )
    }
    assert {"I;16", "I;16B", "I"} <= seen


def test_float_images() -> None:
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    got = decode_image(encode(Image.fromarray(unit), "TIFF"), (1, 3), max_pixels=MAX_PIXELS)
    np.testing.assert_allclose(got[0, :, 0], [0.0, 128 / 255, 1.0], atol=1e-6)
    wide = np.array([[-5.0, 100.0, 300.0, np.nan]], dtype=np.float32)
    got = decode_image(encode(Image.fromarray(wide), "TIFF"), (1, 4), max_pixels=MAX_PIXELS)
    np.testing.assert_allclose(got[0, :, 1], [0.0, 100 / 255, 1.0, 0.0], atol=1e-6)


def test_rgba_composited_on_white() -> None:
    array = np.zeros((2, 3, 4), dtype=np.uint8)
    array[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    array[0, 1] = (255, 0, 0, 255)  # opaque red -> red
    array[0, 2] = (0, 0, 255, 128)  # half-transparent blue -> light blue
    array[1] = (0, 0, 0, 255)  # opaque black
    got = native(encode(Image.fromarray(array, "RGBA"), "PNG"))
    np.testing.assert_allclose(got[0, 0], WHITE)
    np.testing.assert_allclose(got[0, 1], RED)
    np.testing.assert_allclose(got[0, 2], [127 / 255, 127 / 255, 1.0], atol=1.5 / 255)
    np.testing.assert_allclose(got[1], 0.0)


def test_transparency_of_palette_gray_and_la_on_white() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        got = native(encode(palette, fmt, transparency=0))
        np.testing.assert_allclose(got[0, 0], WHITE, err_msg=fmt)
        np.testing.assert_allclose(got[0, 1], [0.0, 1.0, 0.0], err_msg=fmt)
    gray = Image.fromarray(np.array([[0, 100]], dtype=np.uint8))
    got = native(encode(gray, "PNG", transparency=0))
    np.testing.assert_allclose(got[0], [WHITE, np.full(3, 100 / 255)], atol=1e-6)
    la = Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA")
    got = native(encode(la, "PNG"))
    np.testing.assert_allclose(got[0], [WHITE, np.full(3, 50 / 255)], atol=1e-6)


def test_gray_and_bilevel_become_equal_channels(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = corpus
    for name in ("gray.jpg", "bilevel.png", "gray16.png"):
        got = load_image(str(folder / name), (40, 50), LIMITS)
        assert_image(got, 40, 50)
        assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 1], got[..., 2])
    bilevel = native((folder / "bilevel.png").read_bytes())
    assert set(np.unique(bilevel)) <= {0.0, 1.0}


def test_cmyk_jpeg_colours() -> None:
    red = Image.new("RGB", (16, 16), (220, 30, 30))
    got = native(encode(red.convert("CMYK"), "JPEG", quality=95))
    np.testing.assert_allclose(got.mean(axis=(0, 1)), [220 / 255, 30 / 255, 30 / 255], atol=0.03)


def test_animated_gif_gives_first_frame() -> None:
    got = native(animated_gif())
    assert_image(got, 16, 24)
    np.testing.assert_allclose(got.reshape(-1, 3).mean(axis=0), RED, atol=1e-6)


def test_real_photos(tmp_path: Path) -> None:
    from skimage import data

    paths = build_good_photos(tmp_path)
    assert [p.name for p in paths] == ["chelsea.jpg", "coffee.jpg", "astronaut.jpg"]
    for path in paths:
        original = getattr(data, path.stem)().astype(np.float32) / 255
        height, width = original.shape[:2]
        same = load_image(str(path), (height, width), LIMITS)
        assert_image(same, height, width)
        assert np.abs(same - original).mean() < 0.02  # JPEG at quality 95
        small = load_image(str(path), SIZE, LIMITS)
        assert_image(small, *SIZE)
        want = Image.fromarray(getattr(data, path.stem)()).resize(
            SIZE[::-1], Image.Resampling.BILINEAR
        )
        assert np.abs(small - np.asarray(want, np.float32) / 255).mean() < 0.02


def test_large_jpeg_draft_is_fast_and_faithful(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, _ = corpus
    data = (folder / "large.jpg").read_bytes()
    start = time.perf_counter()
    got = decode_image(data, SIZE, max_pixels=MAX_PIXELS)
    elapsed = time.perf_counter() - start
    with Image.open(io.BytesIO(data)) as im:  # full decode, no draft
        assert im.size == LARGE_SIZE
        want = (
            np.asarray(im.convert("RGB").resize(SIZE[::-1], Image.Resampling.BILINEAR), np.float32)
            / 255
        )
    assert_image(got, *SIZE)
    assert np.abs(got - want).mean() < 0.01
    assert elapsed < 1.0, elapsed


def test_draft_respects_exif_rotation() -> None:
    stored = Image.fromarray(noise_rgb(800, 1200, seed=5))  # 1200 wide x 800 high
    stored.paste((255, 0, 0), (0, 0, 300, 200))
    data = encode(stored, "JPEG", quality=90, exif=exif_bytes(6))
    got = decode_image(data, (120, 80), max_pixels=MAX_PIXELS)  # upright: 800 wide x 1200 high
    with Image.open(io.BytesIO(data)) as im:
        upright = ImageOps.exif_transpose(im).convert("RGB")
    want = np.asarray(upright.resize((80, 120), Image.Resampling.BILINEAR), np.float32) / 255
    assert_image(got, 120, 80)
    assert np.abs(got - want).mean() < 0.02
    assert np.abs(got[5, 75] - RED).max() < 0.15


def test_decode_error_codes() -> None:
    raises(ErrorCode.EMPTY_FILE, decode_image, b"", SIZE, max_pixels=MAX_PIXELS)
    raises(ErrorCode.NOT_AN_IMAGE, decode_image, b"GIF? no" * 10, SIZE, max_pixels=MAX_PIXELS)
    raises(ErrorCode.NOT_AN_IMAGE, decode_image, b"%!PS-Adobe-3.0 EPSF-3.0\n", SIZE, max_pixels=9)
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    raises(ErrorCode.TRUNCATED, decode_image, png[:12], SIZE, max_pixels=MAX_PIXELS)
    gif = animated_gif()
    raises(ErrorCode.TRUNCATED, decode_image, gif[: len(gif) // 4], SIZE, max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError):
        decode_image(png, (0, 10), max_pixels=MAX_PIXELS)


def test_unexpected_errors_become_decode_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.inputs.decode as decoding

    png = encode(Image.new("RGB", (8, 8)), "PNG")

    def boom(im: Image.Image) -> Image.Image:
        raise RuntimeError("something odd")

    monkeypatch.setattr(decoding, "_normalized", boom)
    error = raises(ErrorCode.DECODE_FAILED, decode_image, png, SIZE, max_pixels=MAX_PIXELS)
    assert "something odd" in error.message

    def oom(im: Image.Image) -> Image.Image:
        raise MemoryError

    monkeypatch.setattr(decoding, "_normalized", oom)
    with pytest.raises(MemoryError):
        decode_image(png, SIZE, max_pixels=MAX_PIXELS)


def test_concurrent_decoding_is_consistent(corpus: tuple[Path, dict[str, str | None]]) -> None:
    folder, expected = corpus
    names = [n for n, code in expected.items() if code is None and n != "large.jpg"]
    blobs = [(folder / n).read_bytes() for n in names] * 4
    serial = [decode_image(b, (64, 64), max_pixels=MAX_PIXELS) for b in blobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda b: decode_image(b, (64, 64), max_pixels=MAX_PIXELS), blobs))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore")
def test_fuzzed_images_decode_or_raise_image_error() -> None:
    outcomes: Counter[str] = Counter()
    for data in mutated_images(210):
        try:
            array = decode_image(data, (32, 32), max_pixels=1_000_000)
        except ImageError as exc:
            assert isinstance(exc.code, ErrorCode) and exc.message
            outcomes[exc.code.value] += 1
        else:
            assert_image(array, 32, 32)
            outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and sum(outcomes.values()) == 210
    assert len(outcomes) >= 3, outcomes


# ------------------------------------------------------------------------ local files


def test_read_source_returns_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a b%.png"
    path.write_bytes(b"\x89PNG some bytes")
    assert read_source(str(path), LIMITS) == b"\x89PNG some bytes"
    assert read_source(path.as_uri(), LIMITS) == b"\x89PNG some bytes"
    assert read_source("file://localhost" + path.as_uri()[7:], LIMITS) == b"\x89PNG some bytes"


def test_local_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "big.png").write_bytes(b"x" * 1001)
    (tmp_path / "ok.png").write_bytes(b"x" * 1000)
    small = replace(LIMITS, max_bytes=1000)
    raises(ErrorCode.EMPTY_FILE, read_source, str(tmp_path / "empty.png"), LIMITS)
    error = raises(ErrorCode.TOO_LARGE, read_source, str(tmp_path / "big.png"), small)
    assert "IMGQ_MAX_IMAGE_BYTES" in error.message
    assert len(read_source(str(tmp_path / "ok.png"), small)) == 1000
    raises(ErrorCode.NOT_FOUND, read_source, str(tmp_path / "nope.png"), LIMITS)
    raises(ErrorCode.NOT_FOUND, read_source, str(tmp_path / "ok.png" / "x.png"), LIMITS)
    raises(ErrorCode.NOT_FOUND, read_source, str(tmp_path / "nul\x00.png"), LIMITS)
    raises(ErrorCode.IS_DIRECTORY, read_source, str(tmp_path), LIMITS)
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    raises(ErrorCode.NOT_FOUND, read_source, str(loop), LIMITS)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    start = time.monotonic()
    raises(ErrorCode.UNSUPPORTED_SOURCE, read_source, str(fifo), LIMITS)
    assert time.monotonic() - start < 1.0


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(b"data")
    real_open = os.open
    target = os.path.realpath(path)

    def fake_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(file) == target:
            raise PermissionError(13, "Permission denied", file)
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    error = raises(ErrorCode.PERMISSION_DENIED, read_source, str(path), LIMITS)
    assert "permission denied" in error.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_by_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(b"data")
    path.chmod(0)
    raises(ErrorCode.PERMISSION_DENIED, read_source, str(path), LIMITS)


def test_unsupported_sources() -> None:
    for ref in (
        "ftp://example.com/a.jpg",
        "gs://bucket/a.jpg",
        "data:image/png;base64,AAAA",
        "relative/a.jpg",
        "file://otherhost/a.jpg",
        "http://[::1",
    ):
        raises(ErrorCode.UNSUPPORTED_SOURCE, read_source, ref, LIMITS)


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, ReadLimits]:
    """An allowed root with an image, a sibling directory outside it, and the limits."""
    root = tmp_path / "root"
    outside = tmp_path / "root2"  # shares the root's name as a prefix: still outside
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "in.png").write_bytes(b"inside")
    (outside / "out.png").write_bytes(b"outside")
    return root, outside, replace(LIMITS, allowed_roots=(root,))


def test_allowed_roots(roots: tuple[Path, Path, ReadLimits]) -> None:
    root, outside, limits = roots
    assert read_source(str(root / "sub" / "in.png"), limits) == b"inside"
    assert read_source(str(root / "sub" / ".." / "sub" / "in.png"), limits) == b"inside"
    error = raises(ErrorCode.OUTSIDE_ALLOWED_ROOTS, read_source, str(outside / "out.png"), limits)
    assert "IMGQ_ALLOWED_ROOTS" in error.message
    escape = f"{root}/sub/../../{outside.name}/out.png"
    raises(ErrorCode.OUTSIDE_ALLOWED_ROOTS, read_source, escape, limits)
    raises(ErrorCode.OUTSIDE_ALLOWED_ROOTS, read_source, (outside / "out.png").as_uri(), limits)
    # Outside the roots, a missing file is refused the same way (no existence oracle).
    raises(ErrorCode.OUTSIDE_ALLOWED_ROOTS, read_source, str(outside / "nope.png"), limits)
    raises(ErrorCode.NOT_FOUND, read_source, str(root / "nope.png"), limits)


def test_allowed_roots_and_symlinks(roots: tuple[Path, Path, ReadLimits], tmp_path: Path) -> None:
    root, outside, limits = roots
    (root / "link_out.png").symlink_to(outside / "out.png")
    (root / "dir_out").symlink_to(outside)
    (root / "link_in.png").symlink_to(root / "sub" / "in.png")
    (root / "rel_in.png").symlink_to(Path("sub") / "in.png")
    raises(ErrorCode.OUTSIDE_ALLOWED_ROOTS, read_source, str(root / "link_out.png"), limits)
    raises(ErrorCode.OUTSIDE_ALLOWED_ROOTS, read_source, str(root / "dir_out" / "out.png"), limits)
    assert read_source(str(root / "link_in.png"), limits) == b"inside"
    assert read_source(str(root / "rel_in.png"), limits) == b"inside"
    # A root named through a symlink is resolved too.
    (tmp_path / "root_alias").symlink_to(root)
    aliased = replace(limits, allowed_roots=(tmp_path / "root_alias",))
    assert read_source(str(root / "sub" / "in.png"), aliased) == b"inside"
    assert read_source(str(tmp_path / "root_alias" / "sub" / "in.png"), aliased) == b"inside"
    two = replace(limits, allowed_roots=(tmp_path / "elsewhere", outside))
    assert read_source(str(root / "link_out.png"), two) == b"outside"


def test_limits_from_settings() -> None:
    settings = Settings(
        allowed_roots="/data/a, /data/b",
        max_image_bytes=1234,
        max_image_pixels=5678,
        fetch_timeout=2.5,
        fetch_max_redirects=2,
        allow_private_urls=True,
    )
    assert ReadLimits.from_settings(settings) == ReadLimits(
        allowed_roots=(Path("/data/a"), Path("/data/b")),
        max_bytes=1234,
        max_pixels=5678,
        fetch_timeout=2.5,
        max_redirects=2,
        allow_private_urls=True,
    )


# ------------------------------------------------------------------------------- URLs

PNG_BYTES = encode(Image.fromarray(noise_rgb(30, 40, seed=3)), "PNG")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stop: threading.Event
    hits: Counter[str]


class _Handler(BaseHTTPRequestHandler):
    """Routes for the URL tests; HTTP/1.0, one request per connection."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if "Content_Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, interval: float, *, length: bool = True) -> None:
        self.send_response(200)
        if length:
            self.send_header("Content-Length", "1000000")
        self.end_headers()
        try:
            while not self.server.stop.wait(interval):
                self.wfile.write(b"x")
                self.wfile.flush()
        except OSError:
            pass

    def do_GET(self) -> None:
        """Serve the test routes."""
        self.server.hits[self.path] += 1
        path = self.path
        if path == "/img.png":
            self._send(200, PNG_BYTES, Content_Type="image/png")
        elif path == "/missing.png":
            self._send(404, b"not here")
        elif path == "/error.png":
            self._send(500, b"oops")
        elif path == "/empty.png":
            self._send(200, b"")
        elif path == "/page.png":
            self._send(200, b"<html>login required</html>", Content_Type="text/html")
        elif path == "/redirect.png":
            self._send(302, Location="/img.png")
        elif path == "/redirect-twice.png":
            self._send(301, Location="/redirect.png")
        elif path == "/loop.png":
            self._send(302, Location="/loop.png")
        elif path == "/to-file.png":
            self._send(302, Location="file:///etc/passwd")
        elif path == "/no-location.png":
            self._send(302)
        elif path == "/declared-big.png":
            self._send(200, b"x" * 100, Content_Length=str(10**9))
        elif path == "/streamed-big.png":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 300_000)  # no Content-Length: ends when the server closes
        elif path == "/slow.png":
            self._drip(0.05)
        elif path == "/drip.png":
            self._drip(0.4, length=False)
        elif path == "/hang.png":
            self.server.stop.wait(10)
        else:
            self._send(404)


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    """A local HTTP server on 127.0.0.1 in a thread."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.stop = threading.Event()
    httpd.hits = Counter()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.stop.set()
    httpd.shutdown()
    httpd.server_close()


def url(server: _Server, path: str) -> str:
    """The URL of a path on the test server."""
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


PRIVATE_OK = replace(LIMITS, allow_private_urls=True, fetch_timeout=3.0)


def test_url_image_ok(server: _Server) -> None:
    assert read_source(url(server, "/img.png"), PRIVATE_OK) == PNG_BYTES
    assert_image(load_image(url(server, "/img.png"), (30, 40), PRIVATE_OK), 30, 40)
    with httpx.Client() as client:  # a caller's client is used as it is, redirects by hand
        assert read_source(url(server, "/redirect-twice.png"), PRIVATE_OK, client=client) == (
            PNG_BYTES
        )


def test_url_http_errors(server: _Server) -> None:
    error = raises(ErrorCode.FETCH_FAILED, read_source, url(server, "/missing.png"), PRIVATE_OK)
    assert "404" in error.message
    error = raises(ErrorCode.FETCH_FAILED, read_source, url(server, "/error.png"), PRIVATE_OK)
    assert "500" in error.message
    raises(ErrorCode.EMPTY_FILE, read_source, url(server, "/empty.png"), PRIVATE_OK)
    raises(ErrorCode.NOT_AN_IMAGE, load_image, url(server, "/page.png"), SIZE, PRIVATE_OK)
    raises(ErrorCode.FETCH_FAILED, read_source, url(server, "/no-location.png"), PRIVATE_OK)


def test_url_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = raises(
        ErrorCode.FETCH_FAILED, read_source, f"http://127.0.0.1:{port}/a.png", PRIVATE_OK
    )
    assert "connect" in error.message


def test_url_redirects(server: _Server) -> None:
    assert read_source(url(server, "/redirect.png"), PRIVATE_OK) == PNG_BYTES
    one = replace(PRIVATE_OK, max_redirects=1)
    raises(ErrorCode.FETCH_FAILED, read_source, url(server, "/redirect-twice.png"), one)
    none = replace(PRIVATE_OK, max_redirects=0)
    raises(ErrorCode.FETCH_FAILED, read_source, url(server, "/redirect.png"), none)
    before = server.hits["/loop.png"]
    error = raises(ErrorCode.FETCH_FAILED, read_source, url(server, "/loop.png"), PRIVATE_OK)
    assert "too many redirects" in error.message
    assert server.hits["/loop.png"] - before == PRIVATE_OK.max_redirects + 1
    raises(ErrorCode.UNSUPPORTED_SOURCE, read_source, url(server, "/to-file.png"), PRIVATE_OK)


def test_url_too_large(server: _Server) -> None:
    small = replace(PRIVATE_OK, max_bytes=100_000)
    error = raises(ErrorCode.TOO_LARGE, read_source, url(server, "/declared-big.png"), small)
    assert "IMGQ_MAX_IMAGE_BYTES" in error.message
    raises(ErrorCode.TOO_LARGE, read_source, url(server, "/streamed-big.png"), small)
    assert len(read_source(url(server, "/streamed-big.png"), PRIVATE_OK)) == 300_000


@pytest.mark.parametrize("path", ["/slow.png", "/drip.png", "/hang.png"])
def test_url_timeout_is_a_deadline(server: _Server, path: str) -> None:
    # /slow.png never finishes, /drip.png sends a byte every 0.4 s (each read is quick
    # enough for a per-read timeout), /hang.png never answers.
    limits = replace(PRIVATE_OK, fetch_timeout=0.5)
    start = time.monotonic()
    error = raises(ErrorCode.FETCH_TIMEOUT, read_source, url(server, path), limits)
    elapsed = time.monotonic() - start
    assert 0.45 <= elapsed < 0.8, elapsed
    assert "IMGQ_FETCH_TIMEOUT" in error.message


def test_private_urls_refused(server: _Server) -> None:
    port = server.server_address[1]
    before = sum(server.hits.values())
    for ref in (url(server, "/img.png"), f"http://localhost:{port}/img.png"):
        error = raises(ErrorCode.URL_REFUSED, read_source, ref, LIMITS)
        assert "IMGQ_ALLOW_PRIVATE_URLS" in error.message and "loopback" in error.message
    assert sum(server.hits.values()) == before  # refused before any connection
    for ref in (
        "http://10.1.2.3/a.png",
        "http://192.168.0.1/a.png",
        "http://169.254.169.254/",
        "http://0.0.0.0/",
        "http://[::1]/",
        "http://[fe80::1]/",
        "http://224.0.0.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://100.64.0.1/",
        "https://240.0.0.1/",
        "http://127.1/",
        "http://2130706433/",
    ):
        raises(ErrorCode.URL_REFUSED, read_source, ref, LIMITS)


# Name resolution for the pinning tests, without a network.
FAKE_DNS = {
    "images.example": ["93.184.216.34"],
    "internal.example": ["10.0.0.5"],
    "mixed.example": ["93.184.216.34", "127.0.0.1"],
}


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """socket.getaddrinfo answering from FAKE_DNS; other names do not resolve."""

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in FAKE_DNS:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in FAKE_DNS[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def mock_client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    """An httpx client whose transport is a function (no network)."""
    return httpx.Client(transport=httpx.MockTransport(handler))


@pytest.mark.usefixtures("fake_dns")
def test_public_host_is_pinned_to_the_checked_address() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/start.png":
            return httpx.Response(302, headers={"Location": "/img.png"})
        if request.url.path == "/secure.png":
            return httpx.Response(302, headers={"Location": "https://images.example/img.png"})
        return httpx.Response(200, content=PNG_BYTES)

    with mock_client(handler) as client:
        assert read_source("http://images.example/start.png", LIMITS, client=client) == PNG_BYTES
        # Plain http connects to the address that was checked (no second DNS lookup).
        assert [(r.url.host, r.url.path, r.headers["host"]) for r in seen] == [
            ("93.184.216.34", "/start.png", "images.example"),
            ("93.184.216.34", "/img.png", "images.example"),
        ]
        seen.clear()
        # https keeps the name (TLS verifies it), after the same address check.
        assert read_source("http://images.example/secure.png", LIMITS, client=client) == PNG_BYTES
        assert [(r.url.scheme, r.url.host, r.headers["host"]) for r in seen] == [
            ("http", "93.184.216.34", "images.example"),
            ("https", "images.example", "images.example"),
        ]


@pytest.mark.usefixtures("fake_dns")
def test_redirect_to_private_address_refused() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path == "/to-internal.png":
            return httpx.Response(302, headers={"Location": "http://internal.example/x.png"})
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/"})

    with mock_client(handler) as client:
        for path in ("/to-internal.png", "/to-metadata.png"):
            error = raises(
                ErrorCode.URL_REFUSED,
                read_source,
                f"http://images.example{path}",
                LIMITS,
                client=client,
            )
            assert "private" in error.message or "link-local" in error.message
        raises(
            ErrorCode.URL_REFUSED, read_source, "http://mixed.example/a.png", LIMITS, client=client
        )
        raises(
            ErrorCode.URL_REFUSED,
            read_source,
            "https://internal.example/a.png",
            LIMITS,
            client=client,
        )
    assert len(seen) == 2  # only the two public first hops were requested


@pytest.mark.usefixtures("fake_dns")
def test_dns_failure_is_fetch_failed() -> None:
    for limits in (LIMITS, PRIVATE_OK):
        error = raises(ErrorCode.FETCH_FAILED, read_source, "http://nowhere.invalid/a.png", limits)
        assert "nowhere.invalid" in error.message or "resolve" in error.message

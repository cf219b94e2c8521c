"""The libjpeg-turbo fast path for plain JPEGs agrees with the Pillow path, and hands
everything it is not sure of to Pillow."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

import workers.inputs.decode as decoding
from tests.corpus import corner_marked, encode, exif_bytes
from workers.inputs import decode_image

MAX_PIXELS = 10**8


def photo(width: int = 640, height: int = 480) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea()).resize((width, height))


def pillow_only(data: bytes, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(decoding, "simplejpeg", None)
        return decode_image(data, size, max_pixels=MAX_PIXELS)


def test_fast_path_is_taken_for_plain_jpegs(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(photo(), "JPEG", quality=90)
    calls = []
    real = decoding._decode_jpeg_fast

    def spy(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(out is not None)
        return out

    monkeypatch.setattr(decoding, "_decode_jpeg_fast", spy)
    decode_image(data, (224, 224), max_pixels=MAX_PIXELS)
    assert calls == [True]


@pytest.mark.parametrize("size", [(224, 224), (32, 32), (300, 500)])
def test_fast_and_pillow_paths_agree(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = encode(photo(), "JPEG", quality=90)
    fast = decode_image(data, size, max_pixels=MAX_PIXELS)
    slow = pillow_only(data, size, monkeypatch)
    assert fast.shape == slow.shape == (*size, 3)
    assert fast.dtype == slow.dtype == np.uint8
    # Different DCT downscaling steps, same picture.
    assert float(np.abs(fast / 255 - slow / 255).mean()) < 0.02


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_path_applies_exif_orientation(orientation: int) -> None:
    data = encode(corner_marked(40, 24), "JPEG", quality=95, exif=exif_bytes(orientation))
    assert decoding._jpeg_orientation(data) == orientation
    with Image.open(io.BytesIO(data)) as im:
        reference = ImageOps.exif_transpose(im).convert("RGB")
    width, height = reference.size
    got = decode_image(data, (height, width), max_pixels=MAX_PIXELS) / 255
    want = np.asarray(reference, dtype=np.float32) / 255
    assert np.abs(got - want).mean() < 0.01


def test_jpegs_the_fast_path_leaves_to_pillow() -> None:
    cmyk = encode(photo(64, 48).convert("CMYK"), "JPEG")
    assert decoding._decode_jpeg_fast(cmyk, 32, 32, MAX_PIXELS) is None
    truncated = encode(photo(), "JPEG")[:3000]
    assert decoding._decode_jpeg_fast(truncated, 32, 32, MAX_PIXELS) is None
    broken_exif = bytearray(encode(photo(64, 48), "JPEG", exif=exif_bytes(6)))
    start = broken_exif.index(b"Exif\x00\x00")
    broken_exif[start + 6 : start + 8] = b"XX"
    assert decoding._jpeg_orientation(bytes(broken_exif)) is None
    assert decoding._decode_jpeg_fast(bytes(broken_exif), 32, 32, MAX_PIXELS) is None


def test_fast_path_refuses_bombs_from_the_header() -> None:
    data = encode(photo(640, 480), "JPEG")
    with pytest.raises(decoding.ImageError) as err:
        decoding._decode_jpeg_fast(data, 32, 32, max_pixels=640 * 480 - 1)
    assert err.value.code.value == "decompression_bomb"

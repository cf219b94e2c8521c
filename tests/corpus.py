"""Generated test images: a corpus of broken and awkward files, and a few real photos.

``build_bad_corpus`` returns, per file name, the ErrorCode value that reading and
decoding the file must give, or None when it must decode fine.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from shared.schemas import ErrorCode

BOMB_SIDE = 20_000  # the bomb PNG declares BOMB_SIDE x BOMB_SIDE pixels
LARGE_SIZE = (6000, 4000)  # width, height of the large JPEG
EXIF_ORIENTATION = 0x0112


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit grayscale PNG of side x side pixels, all black: tiny on disk."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    parts = []
    for start in range(0, side, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, side - start)))
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def noise_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random RGB content (uint8), so that codecs have real data to encode."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    """The image encoded in a format, as bytes."""
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def corner_marked(width: int, height: int) -> Image.Image:
    """A blue RGB image with a red block in its top-left corner (to see rotations)."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[...] = (0, 0, 255)
    array[: height // 3, : width // 3] = (255, 0, 0)
    return Image.fromarray(array)


def exif_bytes(orientation: int) -> bytes:
    """An EXIF block carrying only an orientation tag."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif.tobytes()


def animated_gif() -> bytes:
    """A three-frame GIF: red, green, blue (the first frame is red)."""
    frames = [
        Image.new("RGB", (24, 16), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))
    ]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def large_jpeg() -> bytes:
    """A 6000x4000 JPEG made from a real photo scaled up (for draft decoding)."""
    from skimage import data

    photo = Image.fromarray(data.coffee())  # 600 x 400
    return encode(photo.resize(LARGE_SIZE, Image.Resampling.BILINEAR), "JPEG", quality=85)


def _files() -> dict[str, tuple[bytes, str | None]]:
    """Name -> (content, expected ErrorCode value or None) for the on-disk corpus."""
    rgb = Image.fromarray(noise_rgb(120, 160))
    jpeg = encode(rgb, "JPEG", quality=90)
    png = encode(rgb, "PNG")
    idat = png.index(b"IDAT")
    gray16 = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    rgba = np.dstack([noise_rgb(40, 50, seed=2), np.full((40, 50), 128, dtype=np.uint8)])
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 0
    ok = None
    return {
        "empty.jpg": (b"", ErrorCode.EMPTY_FILE.value),
        "text.jpg": (b"this is a text file, not a JPEG\n" * 4, ErrorCode.NOT_AN_IMAGE.value),
        "html.png": (b"<!doctype html><html><body>404</body></html>", ErrorCode.NOT_AN_IMAGE.value),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], ErrorCode.TRUNCATED.value),
        "truncated.png": (png[: idat + 200], ErrorCode.TRUNCATED.value),
        "header_only.png": (png[:20], ErrorCode.TRUNCATED.value),
        "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG", quality=90), ok),
        "gray16.png": (encode(Image.fromarray(gray16), "PNG"), ok),
        "palette.png": (encode(palette, "PNG"), ok),
        "palette_transparent.png": (encode(palette_transparent, "PNG", transparency=0), ok),
        "rgba.png": (encode(Image.fromarray(rgba, "RGBA"), "PNG"), ok),
        "la.png": (encode(Image.fromarray(rgba, "RGBA").convert("LA"), "PNG"), ok),
        "bilevel.png": (encode(rgb.convert("1"), "PNG"), ok),
        "gray.jpg": (encode(rgb.convert("L"), "JPEG", quality=90), ok),
        "animated.gif": (animated_gif(), ok),
        "exif_rotated.jpg": (encode(corner_marked(60, 40), "JPEG", exif=exif_bytes(6)), ok),
        "one_pixel.png": (encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), ok),
        "float.tiff": (encode(Image.fromarray(gray16.astype(np.float32) / 65535), "TIFF"), ok),
        "photo.webp": (encode(rgb, "WEBP", quality=80), ok),
        "photo.bmp": (encode(rgb, "BMP"), ok),
        "bomb.png": (bomb_png(), ErrorCode.DECOMPRESSION_BOMB.value),
        "large.jpg": (large_jpeg(), ok),
    }


def build_bad_corpus(directory: Path) -> dict[str, str | None]:
    """Write the corpus into directory; name -> expected ErrorCode value, None for "decodes".

    Besides files, the corpus has a directory named like an image (``dir.jpg``) and a
    name that does not exist on disk (``missing.jpg``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for name, (content, code) in _files().items():
        (directory / name).write_bytes(content)
        expected[name] = code
    (directory / "dir.jpg").mkdir(exist_ok=True)
    expected["dir.jpg"] = ErrorCode.IS_DIRECTORY.value
    expected["missing.jpg"] = ErrorCode.NOT_FOUND.value
    return expected


def build_good_photos(directory: Path) -> list[Path]:
    """Write scikit-image's chelsea, coffee and astronaut photos as JPEGs; their paths."""
    from skimage import data

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("chelsea", "coffee", "astronaut"):
        path = directory / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).save(path, "JPEG", quality=95)
        paths.append(path)
    return paths


def mutated_images(n: int, seed: int = 20_240_611) -> list[bytes]:
    """n damaged variants of a JPEG, a PNG and a GIF: bytes flipped, headers hit,
    data cut short, junk inserted, or several of these (seeded: the same every run)."""
    import random

    rng = random.Random(seed)
    photo = Image.fromarray(noise_rgb(48, 64, seed=7))
    bases = [
        encode(photo, "JPEG", quality=80, exif=exif_bytes(3)),
        encode(photo.convert("RGBA"), "PNG"),
        animated_gif(),
    ]
    out = []
    for i in range(n):
        data = bytearray(bases[i % len(bases)])
        kind = rng.choice(("flip", "header", "truncate", "insert", "mix"))
        if kind in ("flip", "mix"):
            for _ in range(rng.randint(1, 12)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        if kind == "header":
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(min(64, len(data)))] = rng.randrange(256)
        if kind in ("truncate", "mix"):
            del data[rng.randrange(1, len(data)) :]
        if kind in ("insert", "mix"):
            at = rng.randrange(len(data) + 1)
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        out.append(bytes(data))
    return out

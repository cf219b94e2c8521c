"""Decoding: image bytes to uint8 RGB for a model (libjpeg-turbo fast path, Pillow,
EXIF orientation, decompression bombs).

No TensorFlow here: Pillow decodes, numpy hands the pixels over. The pixels stay
uint8 all the way to the model, whose runtime casts and scales them to [0, 1]
(a quarter of float32's bytes to stack, queue and copy to a GPU).
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache
from typing import Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from shared.image_formats import IMAGE_FORMATS
from shared.schemas import ErrorCode
from workers.inputs.errors import ImageError, describe

try:  # libjpeg-turbo with little Python per image; Pillow decodes everything without it
    import simplejpeg
except ImportError:  # pragma: no cover - the worker extra installs it
    simplejpeg = None

# Formats imgq decodes (shared with the producer's folder expansion, by extension).
SUPPORTED_FORMATS: tuple[str, ...] = tuple(IMAGE_FORMATS)
# Unambiguous signatures of supported formats: data that starts like one of these
# but that Pillow cannot open is a broken file (TRUNCATED), not a non-image.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
# Errors Pillow raises while reading pixel data of a broken (truncated/corrupt) file.
_CORRUPT_ERRORS: tuple[type[Exception], ...] = (EOFError, SyntaxError, struct.error, zlib.error)
_CORRUPT_HINTS = (
    "truncated",
    "broken",
    "corrupt",
    "premature",
    "decoding error",
    "buffer overrun",
    "unrecognized data stream",
    "not enough image data",
    "failed to read next frame",
    "decoder error -1",
    "decoder error -2",
    "decoder error -3",
)


def decode_image(
    data: bytes, size: tuple[int, int], *, max_pixels: int, exact: bool = False
) -> npt.NDArray[np.uint8]:
    """Decode image bytes to uint8 RGB of shape (height, width, 3) (0..255).

    ``exact``: decode JPEGs in full, then resize (no DCT-domain downscaling).
    """
    height, width = _target_size(size)
    if not data:
        raise ImageError(ErrorCode.EMPTY_FILE, "the image data is empty (0 bytes)")
    try:
        fast = _decode_jpeg_fast(data, height, width, max_pixels, exact=exact)
        return fast if fast is not None else _decode(data, height, width, max_pixels, exact)
    except (ImageError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(str(exc), max_pixels) from exc
    except Exception as exc:
        raise ImageError(
            ErrorCode.DECODE_FAILED, f"could not decode the image: {describe(exc)}"
        ) from exc


def _target_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate (height, width); a bad size is a caller bug (ValueError), not an image error."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width), got {size!r}")
    return int(height), int(width)


def _decode_jpeg_fast(
    data: bytes, height: int, width: int, max_pixels: int, *, exact: bool = False
) -> npt.NDArray[np.uint8] | None:
    """Plain JPEGs straight through libjpeg-turbo (simplejpeg): header, DCT-domain
    downscale and decode in C, with little Python per image. None when the data is
    anything else (CMYK, odd EXIF, a decoder complaint): the Pillow path then decides,
    and gives the precise error code for broken data."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    if w * h > max_pixels:
        raise _bomb((w, h), max_pixels)
    orientation = _jpeg_orientation(data)
    if orientation is None:
        return None
    stored = _stored_size(height, width, orientation)
    try:
        # Decoded at 1/2, 1/4 or 1/8 scale while staying >= the target size
        # (exact: at full size).
        scale = {} if exact else {"min_width": stored[0], "min_height": stored[1]}
        array = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **scale)
    except ValueError:
        return None
    if (array.shape[1], array.shape[0]) != stored or orientation != 1:
        upright = _transposed(_resized(Image.fromarray(array), stored), orientation)
        array = np.asarray(upright)
    return np.ascontiguousarray(array, dtype=np.uint8)


def _jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation of a JPEG (1 without EXIF), or None when the EXIF block
    cannot be read with certainty (the Pillow path then takes the image)."""
    pos = 2
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no EXIF before it
            return 1
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            return _tiff_orientation(segment[6:])
        pos += 2 + length
    return None


def _tiff_orientation(tiff: bytes) -> int | None:
    """Tag 0x0112 of IFD0 of a TIFF structure (an EXIF block); 1 when absent."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[entry : entry + 2], order) == _ORIENTATION_TAG:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _decode(
    data: bytes, height: int, width: int, max_pixels: int, exact: bool = False
) -> npt.NDArray[np.uint8]:
    """Open, check, decode, convert, resize and orient one image."""
    with _open(data) as im:  # closing the file also frees im: finish inside the block
        if im.width * im.height > max_pixels:
            raise _bomb(im.size, max_pixels)
        # JPEG EXIF is in the header: no decoding to read it.
        if im.format in _JPEG_FORMATS and not exact:
            _draft(im, _stored_size(height, width, _orientation(im)))
        _load(im)
        orientation = _orientation(im)  # after load: PNG may keep EXIF after the pixel data
        stored = _stored_size(height, width, orientation)
        upright = _transposed(_resized(_normalized(im), stored), orientation)
        return np.asarray(_flattened(upright), dtype=np.uint8)


@cache
def _formats() -> tuple[str, ...]:
    """The supported formats this Pillow build can open."""
    Image.init()
    return tuple(name for name in SUPPORTED_FORMATS if name in Image.OPEN)


def _open(data: bytes) -> Image.Image:
    """Identify the image (header only); NOT_AN_IMAGE or TRUNCATED when that fails."""
    try:
        return Image.open(io.BytesIO(data), formats=_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as exc:
        known = _sniff(data)
        if known or (not isinstance(exc, UnidentifiedImageError) and _is_corrupt(exc)):
            what = f"a {known} file" if known else "an image file"
            raise ImageError(
                ErrorCode.TRUNCATED,
                f"the data starts like {what} but is truncated or corrupt ({describe(exc)}); "
                "re-export or re-download the image",
            ) from exc
        if isinstance(exc, UnidentifiedImageError):
            raise ImageError(
                ErrorCode.NOT_AN_IMAGE,
                f"not an image imgq can read (data starts with {data[:16]!r}); "
                f"supported formats: {', '.join(_formats())}",
            ) from exc
        raise


def _sniff(data: bytes) -> str | None:
    """The supported format an unambiguous signature names, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _bomb(size: tuple[int, int] | str, max_pixels: int) -> ImageError:
    """DECOMPRESSION_BOMB naming the size (or Pillow's words), the limit and its setting."""
    if isinstance(size, str):
        what = f"the image is too large to decode safely ({size})"
    else:
        what = f"the image is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    return ImageError(
        ErrorCode.DECOMPRESSION_BOMB,
        f"{what}; the limit is {max_pixels:,} pixels (IMGQ_MAX_IMAGE_PIXELS, and Pillow "
        "refuses more than twice PIL.Image.MAX_IMAGE_PIXELS): raise IMGQ_MAX_IMAGE_PIXELS "
        "if such images are legitimate",
    )


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not fail an otherwise good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _stored_size(height: int, width: int, orientation: int) -> tuple[int, int]:
    """The (width, height) to resize the stored image to, before the EXIF transpose."""
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def _draft(im: Image.Image, stored: tuple[int, int]) -> None:
    """Let libjpeg decode a big JPEG at 1/2, 1/4 or 1/8 scale, keeping >= 2x the target."""
    im.draft(None, (stored[0] * 2, stored[1] * 2))


def _load(im: Image.Image) -> None:
    """Decode the pixel data of the first frame; TRUNCATED for broken data."""
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as exc:
        if _is_corrupt(exc):
            raise ImageError(
                ErrorCode.TRUNCATED,
                f"the {im.format or 'image'} data ends early or is corrupt ({describe(exc)}); "
                "re-export or re-download the image",
            ) from exc
        raise


def _is_corrupt(exc: Exception) -> bool:
    """True for the errors Pillow raises on truncated or corrupt pixel data."""
    if isinstance(exc, _CORRUPT_ERRORS):
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError | ValueError) and any(hint in text for hint in _CORRUPT_HINTS)


def _normalized(im: Image.Image) -> Image.Image:
    """The image as L, RGB or RGBA (8 bits per channel), keeping transparency as alpha."""
    mode = im.mode
    if mode in ("L", "RGB") and "transparency" not in im.info:
        return im
    if mode.startswith("I"):
        return _from_array(_scale_16bit(np.asarray(im)))
    if mode == "F":
        return _from_array(_scale_float(np.asarray(im)))
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
        return im.convert("RGBA")
    if mode == "1":
        return im.convert("L")
    return im.convert("RGB")


def _scale_16bit(array: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """16-bit (or int32 holding 16-bit) samples scaled 0..65535 -> 0..255 with rounding."""
    wide = np.clip(array.astype(np.float64), 0, 65535)
    return np.rint(wide * (255.0 / 65535.0)).astype(np.uint8)


def _scale_float(array: npt.NDArray[np.generic]) -> npt.NDArray[np.uint8]:
    """Float samples to 0..255: [0, 1] data is scaled, anything else is taken as 0..255."""
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.rint(np.clip(values, 0, 255)).astype(np.uint8)


def _from_array(array: npt.NDArray[np.uint8]) -> Image.Image:
    """An L image from a 2-D uint8 array."""
    return Image.fromarray(np.ascontiguousarray(array))


def _resized(im: Image.Image, stored: tuple[int, int]) -> Image.Image:
    """Stretch to (width, height) with bilinear resampling (no crop)."""
    if im.size == stored:
        return im
    return im.resize(stored, Image.Resampling.BILINEAR)


def _transposed(im: Image.Image, orientation: int) -> Image.Image:
    """Apply the EXIF orientation (same transposes as ImageOps.exif_transpose)."""
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


def _flattened(im: Image.Image) -> Image.Image:
    """RGB: gray expanded, alpha composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")

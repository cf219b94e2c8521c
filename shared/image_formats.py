"""The image formats imgq reads, and the file extensions that name them: one list for
the workers' decoder (which formats it opens) and the producer's folder and glob
expansion (which files it picks up), so a file that classifies when named directly
is also found in a folder."""

from __future__ import annotations

# Pillow format name -> the extensions (lower case) of files in that format. Others
# (EPS, which runs Ghostscript; PSD; exotic scientific formats) are refused as
# not_an_image: less attack surface for untrusted input.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif", ".jif"),
    "PNG": (".png", ".apng"),
    "GIF": (".gif",),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp", ".dib"),
    "AVIF": (".avif", ".avifs"),
    "ICO": (".ico",),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm", ".pfm"),
}
IMAGE_EXTENSIONS: frozenset[str] = frozenset(e for exts in IMAGE_FORMATS.values() for e in exts)

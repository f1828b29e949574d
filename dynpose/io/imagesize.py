"""How many pixels an encoded image claims, read from its header before a single pixel is decoded.

A 35-byte GIF can claim 24000 x 24000 pixels and a 400 kB BigTIFF 20000 x 20000: OpenCV allocates the whole frame
before it finds out the data is not there (4.4 GiB for the GIF). So every image goes through `check_pixels` first,
which reads the header with Pillow's parsers (the well-kept header readers; the pixels are never decoded by
Pillow) and refuses a claim over the limit.

Which formats: OpenCV's `imdecode` picks the decoder by the bytes, not by the file name, so the check does too. This
OpenCV build decodes JPEG, PNG, BMP, WebP, AVIF, TIFF (BigTIFF too), JPEG 2000, GIF, PBM/PGM/PPM/PNM, Sun raster,
PFM, PAM and Radiance HDR. Pillow reads the size of all but the last three; those (float and HDR formats no
camera or pose data set uses) are refused while a limit is on, with the way round named: convert the file, or
lift the limit (`max_pixels=None`, `--max-pixels 0`). Bytes that no parser of the list recognises are not an
image OpenCV decodes either, and are refused as unreadable without calling the decoder.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import IO

from dynpose.errors import DynPoseError

# Pillow's names for the formats OpenCV decodes (its readers, tried in this order, each only on its own magic bytes).
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "AVIF", "TIFF", "JPEG2000", "GIF", "PPM", "SUN")
# OpenCV decodes these, Pillow does not read them: (magic prefix, name).
UNSIZED = (
    (b"#?RADIANCE", "Radiance HDR"),
    (b"#?RGBE", "Radiance HDR"),
    (b"PF\n", "PFM"),
    (b"Pf\n", "PFM"),
    (b"P7\n", "PAM"),
)
_PARSE_ERRORS = (SyntaxError, IndexError, TypeError, ValueError, struct.error, EOFError, OSError, KeyError)


class ImageTooLarge(DynPoseError):
    """An image whose header claims more pixels than the limit (the service answers it with 413)."""

    def __init__(self, message: str, width: int, height: int) -> None:
        super().__init__(message)
        self.width, self.height = width, height


@dataclass(frozen=True)
class Header:
    """What an image's header says: its format (Pillow's name, or one of `UNSIZED`'s) and size (None: not read)."""

    format: str | None
    width: int | None = None
    height: int | None = None


def read_header(fp: IO[bytes]) -> Header:
    """The format and size an encoded image's header claims (`fp` at its start, seekable). Reads only the header."""
    from PIL import Image

    prefix = fp.read(16)
    for magic, name in UNSIZED:
        if prefix.startswith(magic):
            return Header(name)
    Image.init()  # registers Pillow's readers (idempotent)
    for fmt in PILLOW_FORMATS:
        factory, accept = Image.OPEN[fmt]
        ok = accept(prefix) if accept is not None else True
        if not ok or isinstance(ok, str):  # a str is Pillow's "maybe, with a warning": not this format's magic
            continue
        fp.seek(0)
        try:
            # the plugin's constructor parses the header only; Image.open would add Pillow's own bomb warning,
            # which this check replaces
            im = factory(fp, "")
        except _PARSE_ERRORS:
            return _fixed_header(fmt, fp)  # its magic, but a header Pillow cannot read in full
        w, h = im.size
        return Header(fmt, int(w), int(h))
    return Header(None)


def _fixed_header(fmt: str, fp: IO[bytes]) -> Header:
    """A PNG's size sits at a fixed place (the IHDR chunk, first): read it there when Pillow gave up on the rest of
    the file (a truncated PNG still claims its size, and OpenCV would still allocate it)."""
    fp.seek(0)
    head = fp.read(24)
    if fmt == "PNG" and len(head) == 24 and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return Header(fmt, int(w), int(h))
    return Header(fmt)


def check_pixels(data: bytes | memoryview | IO[bytes], what: str, max_pixels: int) -> Header:
    """Refuse, before decoding, an image over `max_pixels` by its header (`ImageTooLarge`), one whose size cannot
    be read, or bytes of no format OpenCV decodes (DynPoseError: `what` names the image)."""
    fp: IO[bytes] = io.BytesIO(data) if isinstance(data, bytes | memoryview) else data
    h = read_header(fp)
    if h.format is None and fp.seek(0, io.SEEK_END) == 0:
        raise DynPoseError(f"{what}: empty file")
    if h.format is None:
        raise DynPoseError(
            f"{what}: not a readable image (no JPEG, PNG, BMP, WebP, AVIF, TIFF, JPEG 2000, GIF, PNM or Sun raster header)"
        )
    if h.width is None or h.height is None:
        why = (
            "a format whose size dynpose cannot read" if h.format in {n for _, n in UNSIZED} else "its header cannot be read"
        )
        raise DynPoseError(
            f"{what}: {h.format} image, {why}, so its pixel count cannot be checked before decoding; convert it to "
            "PNG or JPEG (or lift the limit: max_pixels=None, --max-pixels 0)"
        )
    if h.width * h.height > max_pixels:
        raise ImageTooLarge(
            f"{what}: {h.width} x {h.height} pixels by its header, over the limit of {max_pixels:,} (max_pixels; raise "
            "it for such images)",
            h.width,
            h.height,
        )
    return h

"""``load_image``: any supported file (or bytes) to uint8 RGB pixels plus a study context.

Defences against hostile or broken input, in order: empty and oversized files are refused
before they are read; the format comes from magic bytes, never from the file name; the
pixel count is checked from the header before anything is decoded; decoding is forced to
completion so a truncated file fails instead of coming back half grey.

Colour handling: EXIF orientation is applied; alpha is flattened on white (how a viewer
shows a transparent image, and what a model trained on photos expects); 16-bit and float
greyscale (mode I;16 / I / F) is scaled by its actual min-max range, so all recorded
contrast is kept and nothing is clipped (a plain image file has no stored window to honour,
unlike DICOM). CMYK is converted with Pillow's plain formula, not an embedded ICC profile.

Error messages are one line and never contain the file name or DICOM tag values: they can
reach logs, and medical file names often contain patient names.
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from medlens.config import get_settings
from medlens.errors import (
    CorruptImage,
    EmptyInput,
    ImageTooLarge,
    InputError,
    MedLensError,
    UnsupportedImage,
)
from medlens.io.limits import check_aspect, check_budget, estimate_pil
from medlens.io.types import DecodedImage, Identifiers, StudyContext

if TYPE_CHECKING:  # pydicom is imported when a DICOM file arrives (0.7 s of a cold start)
    from pydicom.dataset import Dataset

__all__ = [
    "SUPPORTED_FORMATS",
    "describe_content",
    "load_image",
    "scale_to_uint8",
    "sniff_format",
]

SUPPORTED_FORMATS = "PNG, JPEG, BMP, TIFF, WebP, DICOM"
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP"}
_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_SNIFF_BYTES = 1024
_SCALE_BLOCK = 1 << 20  # pixels per block when scaling high-depth greyscale to uint8
# Image.MAX_IMAGE_PIXELS and ImageFile.LOAD_TRUNCATED_IMAGES are process-wide; the lock keeps
# two loads from restoring each other's values mid-decode.
_PIL_LOCK = threading.Lock()


def load_image(
    source: str | Path | bytes,
    *,
    filename: str | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    max_decode_bytes: int | None = None,
) -> DecodedImage:
    """Decode a path or raw bytes into RGB pixels, a study context and identifiers.

    ``filename`` only matters for DICOM files without the 128-byte preamble (a ``.dcm``
    name makes MedLens try them); limits default to MEDLENS_MAX_BYTES / MEDLENS_MAX_PIXELS /
    MEDLENS_MAX_DECODE_BYTES (the per-image memory budget, see ``medlens.io.limits``).
    """
    settings = get_settings()
    max_bytes = settings.max_bytes if max_bytes is None else int(max_bytes)
    max_pixels = settings.max_pixels if max_pixels is None else int(max_pixels)
    budget = settings.max_decode_bytes if max_decode_bytes is None else int(max_decode_bytes)
    if max_bytes <= 0 or max_pixels <= 0 or budget <= 0:
        raise ValueError("max_bytes, max_pixels and max_decode_bytes must be positive")

    data, name = _read_source(source, max_bytes)
    name = filename if filename is not None else name
    suffix = Path(name).suffix.lower() if name else ""
    digest = hashlib.sha256(data).hexdigest()

    fmt = sniff_format(data)
    if fmt == "dicom" or (fmt is None and (suffix == ".dcm" or _looks_like_bare_dicom(data))):
        from medlens.io.dicom import decode_dicom, read_dataset

        ds = read_dataset(data) if fmt == "dicom" else _read_bare_dicom(data, suffix)
        result = decode_dicom(ds, max_pixels=max_pixels, max_decode_bytes=budget)
        return DecodedImage(result.pixels, result.context, digest, result.identifiers)
    if fmt is None:
        named = f" (file name says {suffix})" if suffix else ""
        raise UnsupportedImage(
            f"not a supported image: looks like {describe_content(data)}{named}; "
            f"supported formats: {SUPPORTED_FORMATS}"
        )

    pixels, pages = _decode_pil(data, fmt, max_pixels, budget)
    height, width = pixels.shape[:2]
    # A multi-page TIFF shows its first page; ``frames`` says how many there were.
    context = StudyContext(source_format=fmt, width=width, height=height, frames=pages)
    return DecodedImage(pixels, context, digest, Identifiers())


def sniff_format(data: bytes) -> str | None:
    """Format from magic bytes: png, jpeg, bmp, tiff, webp, dicom (with preamble) or None."""
    # DICOM first: its 128-byte preamble may itself hold TIFF magic (dual-format files).
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM" and len(data) >= 18:
        (header_size,) = struct.unpack_from("<I", data, 14)
        if header_size in _BMP_HEADER_SIZES:
            return "bmp"
    return None


def describe_content(data: bytes) -> str:
    """A short guess at what a non-image file is, for the error message."""
    head = data[:_SNIFF_BYTES]
    magic = (
        (b"GIF87a", "a GIF image"),
        (b"GIF89a", "a GIF image"),
        (b"%PDF-", "a PDF document"),
        (b"PK\x03\x04", "a ZIP archive (or an Office document)"),
        (b"\x1f\x8b", "gzip-compressed data"),
        (b"BZh", "bzip2-compressed data"),
        (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 image"),
        (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL image"),
        (b"\xff\x0a", "a JPEG XL image"),
        (b"8BPS", "a Photoshop document"),
        (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
        (b"\x93NUMPY", "a NumPy array file"),
        (b"\x7fELF", "an executable program"),
        (b"MZ", "a Windows executable"),
        (b"RIFF", "a RIFF container that is not WebP (audio or video?)"),
    )
    for prefix, what in magic:
        if head.startswith(prefix):
            return what
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "a HEIC/HEIF photo (convert it to JPEG first)"
        if brand in (b"avif", b"avis"):
            return "an AVIF image (convert it to PNG or JPEG first)"
        return "an MP4/QuickTime video"
    if len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI volume (export single slices as PNG or DICOM)"
    text = _as_text(head)
    if text is not None:
        start = text.lstrip().lower()
        if start.startswith(("<!doctype html", "<html")):
            return "an HTML page"
        if start.startswith("<"):
            return "XML or HTML text"
        if start.startswith(("{", "[")):
            return "JSON text"
        return "text"
    return f"unrecognised binary data (starts with {head[:8].hex(' ')})"


def _as_text(head: bytes) -> str | None:
    if b"\x00" in head:
        return None
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
        return text if text and printable / len(text) > 0.95 else None
    return None


def _read_source(source: str | Path | bytes, max_bytes: int) -> tuple[bytes, str | None]:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        _check_size(len(data), max_bytes)
        return data, None
    if not isinstance(source, str | Path):
        raise TypeError(f"load_image takes a path or bytes, not {type(source).__name__}")
    path = Path(source)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise InputError(f"{path} is a folder, not an image file")
        _check_size(size, max_bytes)
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since stat()
    except FileNotFoundError as exc:
        raise InputError(f"no such file: {path}") from exc
    except PermissionError as exc:
        raise InputError(f"no permission to read {path}") from exc
    _check_size(len(data), max_bytes)
    return data, path.name


def _check_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise EmptyInput("the image file is empty (0 bytes); check the upload or the path")
    if size > max_bytes:
        raise ImageTooLarge(
            f"file is {_mib(size)}, over the limit of {_mib(max_bytes)}; "
            "set MEDLENS_MAX_BYTES to raise the limit"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _looks_like_bare_dicom(data: bytes) -> bool:
    """DICOM written without preamble starts with a group 0002 or 0008 tag (little endian)."""
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[3] == 0


def _read_bare_dicom(data: bytes, suffix: str) -> Dataset:
    """Force-read a DICOM candidate without preamble; anything implausible is not DICOM."""
    try:
        from medlens.io.dicom import read_dataset

        ds = read_dataset(data, force=True)
    except CorruptImage:
        ds = None
    plausible = ds is not None and any(
        kw in ds for kw in ("SOPClassUID", "StudyInstanceUID", "Modality", "PixelData", "Rows")
    )
    if not plausible:
        named = f" (file name says {suffix})" if suffix else ""
        raise UnsupportedImage(
            f"not a supported image: looks like {describe_content(data)}{named}, "
            f"not DICOM; supported formats: {SUPPORTED_FORMATS}"
        )
    return ds


def _decode_pil(data: bytes, fmt: str, max_pixels: int, budget: int) -> tuple[np.ndarray, int]:
    label = _PIL_FORMAT[fmt]
    try:
        with _PIL_LOCK:
            saved_limit = Image.MAX_IMAGE_PIXELS
            saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
            # open() reads only the header; Pillow's own bomb check is switched off for it
            # and replaced by ours right after, which knows the size and MEDLENS_MAX_PIXELS.
            Image.MAX_IMAGE_PIXELS = None
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            try:
                image = Image.open(io.BytesIO(data), formats=[label])
                _check_pixels(image.size, max_pixels, label)
                check_aspect(*image.size, label)
                _fit_budget(image, fmt, label, budget)
                pages = int(getattr(image, "n_frames", 1) or 1) if fmt == "tiff" else 1
                # Full decode now, with Pillow's guard back at our limit, so truncation
                # fails here instead of coming back grey.
                Image.MAX_IMAGE_PIXELS = max_pixels
                image.load()
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
                ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated
        image = _orient(image)
        return _to_rgb(image, label), pages
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # backstop
        raise ImageTooLarge(
            f"{label} image is larger than the limit of {max_pixels:,} pixels "
            f"(decompression-bomb guard); set MEDLENS_MAX_PIXELS to raise the limit"
        ) from exc
    except (MedLensError, MemoryError):
        raise
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        IndexError,
        KeyError,
        TypeError,
        struct.error,
        zlib.error,
    ) as exc:
        if isinstance(exc, UnidentifiedImageError):  # its text is just "<_io.BytesIO ...>"
            reason = "header not readable"
        else:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CorruptImage(
            f"{label} data is truncated or corrupt ({reason}); "
            "re-export or re-send the original file"
        ) from exc


def _check_pixels(size: tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{label} image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; set MEDLENS_MAX_PIXELS to raise the limit"
        )
    if width <= 0 or height <= 0:
        raise CorruptImage(f"{label} header declares {width}x{height} pixels; re-export the file")


def _fit_budget(image: Image.Image, fmt: str, label: str, budget: int) -> None:
    """Refuse an image whose decode would exceed the memory budget; a JPEG is decoded at
    1/2, 1/4 or 1/8 scale instead (libjpeg's DCT scaling) when that brings it within."""
    width, height = image.size
    alpha = image.mode in _ALPHA_MODES or "transparency" in image.info

    def need(w: int, h: int) -> int:
        return estimate_pil(w, h, image.mode, alpha=alpha, fmt=fmt)

    if need(width, height) <= budget:
        return
    if fmt == "jpeg":
        for scale in (2, 4, 8):
            w, h = -(-width // scale), -(-height // scale)
            if need(w, h) <= budget:
                image.draft(image.mode, (w, h))
                return
    check_budget(need(width, height), budget, width=width, height=height, label=label)


def _orient(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a malformed EXIF block is ignored rather than fatal."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        return image


def _to_rgb(image: Image.Image, label: str) -> np.ndarray:
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        grey = scale_to_uint8(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in _ALPHA_MODES or (mode in {"P", "L", "RGB"} and "transparency" in image.info)
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image if mode == "RGB" else image.convert("RGB")
    except ValueError as exc:
        raise UnsupportedImage(
            f"{label} colour mode {mode} cannot be converted to RGB; re-export the image as RGB"
        ) from exc
    arr = np.asarray(rgb, dtype=np.uint8)
    return np.ascontiguousarray(arr)


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scale a high-depth greyscale array to uint8 (constant images become 0).

    Works in float64 on blocks of rows, so the float copies stay small however large the
    image (the same arithmetic per pixel as one whole-array pass)."""
    arr = np.asarray(values)
    out = np.zeros(arr.shape, dtype=np.uint8)
    if arr.size == 0:
        return out
    rows = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
    step = max(1, _SCALE_BLOCK // max(1, rows.shape[1]))
    lo, hi = np.inf, -np.inf
    for start in range(0, rows.shape[0], step):
        x = rows[start : start + step].astype(np.float64)
        x = x[np.isfinite(x)]
        if x.size:
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    if not hi > lo:  # no finite value, or a constant image
        return out
    flat = out.reshape(rows.shape)
    for start in range(0, rows.shape[0], step):
        x = rows[start : start + step].astype(np.float64)
        x = np.where(np.isfinite(x), x, lo)
        flat[start : start + step] = np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return out

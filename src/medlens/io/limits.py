"""Shape and memory limits applied from an image's header, before its pixels are decoded.

Two checks, shared by the plain-image and the DICOM decoders:

- **Aspect ratio** at most ``MAX_ASPECT_RATIO`` (20:1). A 1x20000 strip passes any pixel
  limit, but every model input resizes the short side to a few hundred pixels, which would
  turn it into a 224x4,480,000 array (gigabytes). No photo or radiograph is that shape.
- **Memory budget** (``MEDLENS_MAX_DECODE_BYTES``, default 512 MiB per image): the decoders
  estimate the peak of every intermediate array they will allocate (bytes per pixel of the
  path taken, see ``estimate_pil`` / ``estimate_dicom``) and refuse an image whose estimate
  is over the budget. The estimates are upper bounds measured against real decodes
  (tests/test_io.py checks that peak RSS stays below the budget).
"""

from __future__ import annotations

from medlens.errors import ExtremeAspectRatio, ImageTooLarge

__all__ = [
    "MAX_ASPECT_RATIO",
    "check_aspect",
    "check_budget",
    "estimate_dicom",
    "estimate_pil",
]

MAX_ASPECT_RATIO = 20
# Fixed working memory on top of the per-pixel cost (chunked float scaling, decoder state).
_FIXED_OVERHEAD = 32 * 2**20
# Bytes per pixel Pillow uses to hold an image of each mode (RGB is stored as 4 bytes).
_PIL_NATIVE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def check_aspect(width: int, height: int, label: str) -> None:
    """Refuse images more than ``MAX_ASPECT_RATIO`` times longer than wide (or the reverse)."""
    short, long = sorted((int(width), int(height)))
    if short > 0 and long > MAX_ASPECT_RATIO * short:
        raise ExtremeAspectRatio(
            f"{label} image is {width}x{height} pixels, an aspect ratio of {long / short:,.0f}:1, "
            f"over the limit of {MAX_ASPECT_RATIO}:1; crop it to the region of interest"
        )


def estimate_pil(width: int, height: int, mode: str, *, alpha: bool, fmt: str) -> int:
    """Upper bound of the bytes ``images._decode_pil`` allocates for one image."""
    native = _PIL_NATIVE.get(mode, 4)
    per_pixel = 2 * native  # the decoded image, and its copy when EXIF orientation applies
    if fmt == "webp":
        per_pixel += 4  # libwebp decodes into its own RGBA buffer first
    if mode in {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}:
        per_pixel += native + 1 + 3  # numpy copy, uint8 grey, RGB (float work is chunked)
    elif alpha:
        per_pixel += 4 * 4 + 3  # RGBA, white, composite, RGB, then the numpy array
    else:
        per_pixel += (0 if mode == "RGB" else 4) + 3  # conversion to RGB, numpy array
    return width * height * per_pixel + _FIXED_OVERHEAD


def estimate_dicom(rows: int, cols: int, *, samples: int, bits_allocated: int) -> int:
    """Upper bound of the bytes ``dicom.decode_dicom`` allocates for the frame it shows."""
    stored = samples * max(1, (bits_allocated + 7) // 8)
    # The decoded frame (and a decoder's working copy); greyscale goes through the
    # float64 modality and VOI steps (several arrays alive at once); then RGB uint8.
    per_pixel = 2 * stored + (48 if samples == 1 else 8) + 3
    return rows * cols * per_pixel + _FIXED_OVERHEAD


def check_budget(need: int, budget: int, *, width: int, height: int, label: str) -> None:
    if need > budget:
        raise ImageTooLarge(
            f"{label} image of {width}x{height} pixels needs about {_mib(need)} to decode, over "
            f"the per-image memory budget of {_mib(budget)}; downscale it, or set "
            "MEDLENS_MAX_DECODE_BYTES to raise the budget"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"

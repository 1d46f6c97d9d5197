"""Images MedLens must abstain on, built from files that ship with installed packages.

Shared by ``tests/test_ood.py`` and ``benchmarks/ood_gate.py``. None of these was used to
fit or tune the gate (``training.ood`` reads only the sample datasets' training and
validation splits). Kinds:

- ``dicom_pixels``: CT, MR, ultrasound and nuclear-medicine frames from pydicom's test
  files, decoded by MedLens and stripped of their header (the header rule would refuse
  them first; this checks the image gate on its own), one per distinct picture;
- ``natural_photos``: scikit-image's photographs (a cat, an astronaut, coffee, a rocket,
  a horse, motorcycles, the moon ...) and four seeded crops of each;
- ``textures``: brick, grass, gravel, chessboards, and crops of them;
- ``other_medical``: retinal fundus photographs, histology and cell microscopy, a CT
  phantom: medical, but no domain MedLens covers;
- ``faces``: 100 of the LFW face thumbnails shipped with scikit-image;
- ``synthetic``: blanks, noise, gradients, checkerboards, stripes and shapes (seeded),
  including 1x1 and 8x8 images.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

KINDS = ("dicom_pixels", "natural_photos", "textures", "other_medical", "faces", "synthetic")

_PHOTOS = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "horse.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "camera.png",
    "moon.png",
    "hubble_deep_field.jpg",
    "coins.png",
    "page.png",
    "text.png",
    "logo.png",
    "color.png",
    "clock_motion.png",
]
_TEXTURES = ["brick.png", "grass.png", "gravel.png", "chessboard_RGB.png", "chessboard_GRAY.png"]
_MEDICAL = ["retina.jpg", "microaneurysms.png", "cell.png", "ihc.png", "phantom.png"]


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = np.percentile(a, (0.5, 99.5))
        a = np.clip((a - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def _skimage_file(name: str) -> np.ndarray:
    import skimage
    from PIL import Image

    path = Path(skimage.__file__).parent / "data" / name
    with Image.open(path) as im:
        return _rgb(np.asarray(im.convert("RGB")))


def _crops(img: np.ndarray, n: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    h, w = img.shape[:2]
    for _ in range(n):
        s = rng.uniform(0.4, 0.8)
        ch, cw = max(16, int(h * s)), max(16, int(w * s))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        yield np.ascontiguousarray(img[y : y + ch, x : x + cw])


def dicom_pixels() -> list[tuple[str, np.ndarray]]:
    """Distinct CT/MR/US/NM frames from pydicom's test files, as MedLens decodes them."""
    import pydicom
    from pydicom.data import get_testdata_files

    from medlens.errors import MedLensError
    from medlens.io import load_image

    out, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in sorted(get_testdata_files("*.dcm")):
            try:
                mod = pydicom.dcmread(f, stop_before_pixels=True).get("Modality")
            except Exception:
                continue
            if mod not in ("CT", "MR", "US", "NM"):
                continue
            try:
                px = load_image(f).pixels
            except MedLensError:
                continue
            small = px[:: max(1, px.shape[0] // 32), :: max(1, px.shape[1] // 32)]
            digest = hashlib.sha256(small.tobytes()).hexdigest()
            if digest in seen or min(px.shape[:2]) < 16:
                continue
            seen.add(digest)
            out.append((f"{mod} {Path(f).name}", px))
    return out


def synthetic(seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Blanks, noise, gradients, checkerboards, stripes and shapes."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, np.ndarray]] = []
    for v in (0, 128, 255):
        out.append((f"blank {v}", np.full((256, 256, 3), v, np.uint8)))
    out.append(("blank skin tone", np.full((256, 256, 3), (224, 172, 150), np.uint8)))
    out.append(("1x1 pixel", np.full((1, 1, 3), 200, np.uint8)))
    out.append(("8x8 noise", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    for i in range(6):
        out.append((f"uniform noise {i}", rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)))
        g = np.clip(rng.normal(128, 40, (224, 224, 3)), 0, 255).astype(np.uint8)
        out.append((f"gaussian noise {i}", g))
    yy, xx = np.mgrid[0:256, 0:256]
    for i, (a, b) in enumerate(((1, 0), (0, 1), (1, 1), (1, -1))):
        grad = ((a * xx + b * yy) % 256).astype(np.uint8)
        out.append((f"gradient {i}", np.stack([grad, 255 - grad, grad // 2], axis=-1)))
    for k in (4, 8, 16, 32, 64):
        board = (((yy // k) + (xx // k)) % 2 * 255).astype(np.uint8)
        out.append((f"checkerboard {k}px", _rgb(board)))
        stripes = ((xx // k) % 2 * 255).astype(np.uint8)
        out.append((f"stripes {k}px", _rgb(stripes)))
    for i in range(10):
        img = np.full((256, 256, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(rng.integers(2, 8)):
            cy, cx, r = rng.integers(0, 256), rng.integers(0, 256), rng.integers(10, 80)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[mask] = rng.integers(0, 256, 3)
        out.append((f"random shapes {i}", img))
    return out


def build(kind: str, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """The (label, RGB uint8 pixels) images of one kind."""
    rng = np.random.default_rng(seed)
    if kind == "dicom_pixels":
        return dicom_pixels()
    if kind == "synthetic":
        return synthetic(seed)
    if kind == "faces":
        import skimage

        faces = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
        return [
            (f"lfw face {i}", _rgb((f * 255).astype(np.uint8))) for i, f in enumerate(faces[:100])
        ]
    names = {"natural_photos": _PHOTOS, "textures": _TEXTURES, "other_medical": _MEDICAL}[kind]
    out = []
    for name in names:
        img = _skimage_file(name)
        out.append((name, img))
        out += [(f"{name} crop {i}", c) for i, c in enumerate(_crops(img, 4, rng))]
    return out

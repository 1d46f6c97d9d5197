"""Builders for broken and awkward inputs, made from real sample files.

Shared by ``tests/test_io.py`` and ``benchmarks/bad_input_table.py`` so the table in
docs/bad_inputs.md shows exactly what the tests check. Every builder writes one file into
``out_dir`` and returns its path; none of them needs much memory (the 30000x30000 PNG is
written chunk by chunk, never as a pixel array).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

__all__ = [
    "BadInput",
    "SampleFiles",
    "build_all",
    "cmyk_jpeg",
    "dicom_without_pixels",
    "exif_rotated_jpeg",
    "png_16bit",
    "png_bomb",
    "rgba_png",
    "sample_files",
    "strip_png",
    "text_named_png",
    "truncated_dicom",
    "truncated_jpeg",
    "zero_byte_file",
]


@dataclass(frozen=True)
class SampleFiles:
    """Real files under MEDLENS_DATA that the builders start from."""

    cxr_jpeg: Path  # PadChest radiograph, 1036x885 RGB JPEG
    cxr_png: Path  # NIH ChestX-ray14 radiograph, 8-bit greyscale PNG
    cxr_dicom: Path  # JPEG-compressed CR chest DICOM, MONOCHROME2
    cxr_dicom_mono1: Path  # the same image stored as MONOCHROME1
    skin_jpeg: Path  # ISIC 2018 dermoscopy image
    text: Path  # a CSV file from the same data folder


@dataclass(frozen=True)
class BadInput:
    """One built input: a short label for tables and the file it was written to."""

    label: str
    path: Path


def sample_files(data_dir: Path) -> SampleFiles:
    """Locate the real sample files; a missing one is an error, not a skip."""
    cxr = data_dir / "cxr-samples"
    isic = data_dir / "isic2018-task3-test"
    files = SampleFiles(
        cxr_jpeg=cxr / "16747_3_1.jpg",
        cxr_png=cxr / "00000001_000.png",
        cxr_dicom=cxr / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
        cxr_dicom_mono1=cxr / "Fake_MONOHR1.dcm",
        skin_jpeg=isic / "images" / "ISIC_0034524.jpg",
        text=isic / "labels.csv",
    )
    missing = [str(p) for p in vars(files).values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"sample files missing under {data_dir}: {', '.join(missing)}")
    return files


def truncated_jpeg(src: Path, out_dir: Path) -> Path:
    """The first half of a real JPEG, as an interrupted upload leaves it."""
    data = src.read_bytes()
    out = out_dir / "truncated.jpg"
    out.write_bytes(data[: len(data) // 2])
    return out


def zero_byte_file(out_dir: Path) -> Path:
    out = out_dir / "empty.png"
    out.write_bytes(b"")
    return out


def text_named_png(src_text: Path, out_dir: Path) -> Path:
    """A real text file renamed to .png (a common upload mistake)."""
    out = out_dir / "labels.png"
    out.write_bytes(src_text.read_bytes()[:4096])
    return out


def png_bomb(out_dir: Path, side: int = 30000) -> Path:
    """A valid side x side 1-bit PNG of zeros: ~110 KB on disk, ~900 Mpx when decoded."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(side)]
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    out = out_dir / "bomb.png"
    out.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )
    return out


def strip_png(out_dir: Path, width: int = 1, height: int = 20000) -> Path:
    """A valid width x height greyscale PNG strip, made with Pillow: a few hundred bytes on
    disk, under any pixel limit, but resizing its short side to 224 px would need gigabytes."""
    out = out_dir / f"strip_{width}x{height}.png"
    Image.new("L", (width, height), 128).save(out, "PNG", optimize=True)
    return out


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def dicom_without_pixels(src: Path, out_dir: Path) -> Path:
    """A real DICOM header with its Pixel Data element removed (header-only object)."""
    ds = pydicom.dcmread(src)
    del ds.PixelData
    out = out_dir / "no_pixels.dcm"
    ds.save_as(out)
    return out


def truncated_dicom(src: Path, out_dir: Path) -> Path:
    """A real compressed DICOM cut at 60 %, inside its encapsulated pixel data."""
    data = src.read_bytes()
    out = out_dir / "truncated.dcm"
    out.write_bytes(data[: int(len(data) * 0.6)])
    return out


def png_16bit(src: Path, out_dir: Path) -> Path:
    """A real 8-bit greyscale radiograph widened to 16 bits (value x 257, full range)."""
    grey = np.asarray(Image.open(src).convert("L"), dtype=np.uint16)
    out = out_dir / "cxr16.png"
    Image.fromarray(grey * 257).save(out)  # uint16 array -> mode I;16 -> 16-bit PNG
    return out


def cmyk_jpeg(src: Path, out_dir: Path) -> Path:
    """A real photo converted to CMYK and saved as a (print-style) CMYK JPEG."""
    out = out_dir / "cmyk.jpg"
    Image.open(src).convert("RGB").convert("CMYK").save(out, "JPEG", quality=95)
    return out


def exif_rotated_jpeg(src: Path, out_dir: Path, orientation: int = 6) -> Path:
    """A real JPEG stored sideways with an EXIF Orientation tag, as phone cameras write."""
    image = Image.open(src).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = out_dir / f"exif{orientation}.jpg"
    image.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out


def rgba_png(src: Path, out_dir: Path) -> Path:
    """A real photo with its left half fully transparent and its right half opaque."""
    rgb = np.asarray(Image.open(src).convert("RGB"))
    alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    alpha[:, : rgb.shape[1] // 2] = 0
    out = out_dir / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha])).save(out)  # (H, W, 4) uint8 -> RGBA
    return out


def build_all(data_dir: Path, out_dir: Path) -> list[BadInput]:
    """Every bad or awkward input, in the order docs/bad_inputs.md lists them."""
    src = sample_files(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        BadInput(
            "truncated JPEG (real CXR JPEG cut in half)", truncated_jpeg(src.cxr_jpeg, out_dir)
        ),
        BadInput("zero-byte file", zero_byte_file(out_dir)),
        BadInput("text file named .png", text_named_png(src.text, out_dir)),
        BadInput("30000x30000 PNG bomb (1-bit, ~110 KB)", png_bomb(out_dir)),
        BadInput("1x20000 PNG strip (aspect 20000:1)", strip_png(out_dir, 1, 20000)),
        BadInput("1x400000 PNG strip (aspect 400000:1)", strip_png(out_dir, 1, 400000)),
        BadInput("DICOM without pixel data", dicom_without_pixels(src.cxr_dicom, out_dir)),
        BadInput("DICOM cut at 60 %", truncated_dicom(src.cxr_dicom, out_dir)),
        BadInput("16-bit greyscale PNG (real CXR x 257)", png_16bit(src.cxr_png, out_dir)),
        BadInput("CMYK JPEG (real skin photo)", cmyk_jpeg(src.skin_jpeg, out_dir)),
        BadInput("EXIF orientation 6 JPEG (real CXR)", exif_rotated_jpeg(src.cxr_jpeg, out_dir)),
        BadInput("RGBA PNG, left half transparent", rgba_png(src.skin_jpeg, out_dir)),
    ]

"""Value types produced by ``medlens.io``; kept free of decoding code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StudyContext:
    """What MedLens may know, log and store about an image: no direct identifiers.

    DICOM UIDs and free text are *not* here: a Study/Series Instance UID links the result
    to one patient's record at the site as surely as an MRN, and typed text names people.
    They live in ``Identifiers`` (``DecodedImage.identifiers``).
    """

    source_format: str  # "png", "jpeg", "bmp", "tiff", "webp", "dicom"
    width: int
    height: int
    modality: str | None = None  # DICOM Modality, e.g. "CR", "DX"
    body_part: str | None = None  # DICOM BodyPartExamined, e.g. "CHEST"
    view: str | None = None  # ViewPosition, e.g. "PA", "AP", "LL"
    age_years: float | None = None
    sex: str | None = None  # "M", "F", "O" or None
    photometric: str | None = None  # e.g. "MONOCHROME1", "RGB"
    bits_stored: int | None = None
    frames: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Moved to ``Identifiers`` (issue #13); always None here, kept only so callers not yet
    # updated (report.model) read "no UID" instead of failing. Not part of to_dict().
    @property
    def study_uid(self) -> None:
        return None

    @property
    def series_uid(self) -> None:
        return None


@dataclass(frozen=True)
class Identifiers:
    """Direct patient identifiers, kept apart from everything else.

    Its repr and str never reveal values, so an accidental log line leaks nothing.
    """

    values: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Identifiers(<{len(self.values)} fields redacted>)"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.values)

    @property
    def study_uid(self) -> str | None:
        """DICOM StudyInstanceUID, for a site that stores identifiers (audit opt-in)."""
        return self.values.get("StudyInstanceUID")

    @property
    def series_uid(self) -> str | None:
        return self.values.get("SeriesInstanceUID")


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8 (H, W, 3) RGB
    context: StudyContext
    content_hash: str
    identifiers: Identifiers = field(default_factory=Identifiers, repr=False)

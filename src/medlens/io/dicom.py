"""DICOM decoding: display-ready RGB pixels, a study context, and identifiers kept apart.

Greyscale pipeline, in the order DICOM PS3.4 defines for display:

1. Modality LUT (Modality LUT Sequence, or Rescale Slope/Intercept) turns stored values
   into meaningful units (e.g. Hounsfield units).
2. VOI LUT (VOI LUT Sequence, else Window Center/Width with its VOI LUT Function) picks the
   range a radiologist would look at. Enhanced (multi-frame) objects keep both in their
   functional groups; those are read for the frame shown.
3. Without a stored window: data of 8 bits or less with no rescale is shown over its full
   stored range (it was written display-ready, so stretching would change it); anything
   else uses the 0.5-99.5 % percentile window, which ignores the few extreme pixels
   (collimator edges, burned-in labels) that would flatten a min-max window. A stored
   window that maps the whole frame to one grey is ignored in favour of the percentile.
4. MONOCHROME1 (or Presentation LUT Shape INVERSE) is inverted so bone is always bright.

Nothing here logs, and tag values never enter an error message: error messages can end up
in logs, and tag values can identify a patient. pydicom's own value validation, which
warns and logs with the offending value, is switched off while a file is read.
"""

from __future__ import annotations

import copy
import io
import re
import threading
import warnings

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import UID

from medlens.errors import CorruptImage, ImageTooLarge, NoPixelData, UnsupportedImage
from medlens.io.limits import check_aspect, check_budget, estimate_dicom
from medlens.io.types import Identifiers, StudyContext

__all__ = [
    "DIRECT_IDENTIFIERS",
    "FREE_TEXT",
    "UIDS",
    "DicomResult",
    "decode_dicom",
    "deidentify",
    "extract_identifiers",
    "parse_age",
    "read_dataset",
    "study_context",
]

# Elements that name or locate a person (patient, staff, site) or link to records elsewhere.
DIRECT_IDENTIFIERS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "AccessionNumber",
    "StudyID",
)
# Free text typed by people: it routinely contains names, dates and record numbers.
FREE_TEXT: tuple[str, ...] = (
    "PatientComments",
    "ImageComments",
    "StudyComments",
    "StudyDescription",
    "SeriesDescription",
    "AdditionalPatientHistory",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)
# Instance UIDs: not names, but each one links the image to one patient's record at the
# site (and to every other copy of the study), so they are kept with the identifiers and
# never in the context, results or logs. deidentify() keeps them (files need them).
UIDS: tuple[str, ...] = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# Sequences that only carry identifiers; removed whole by deidentify().
_IDENTIFYING_SEQUENCES: tuple[str, ...] = (
    "OtherPatientIDsSequence",
    "ReferencedPatientSequence",
    "ReferringPhysicianIdentificationSequence",
    "PerformingPhysicianIdentificationSequence",
    "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence",
    "OperatorIdentificationSequence",
)
# Type 2 in the common image IODs: they must stay present, so deidentify() empties them.
_BLANK_NOT_REMOVE = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "ReferringPhysicianName",
        "AccessionNumber",
        "StudyID",
    }
)
_REMOVE = frozenset(DIRECT_IDENTIFIERS) | frozenset(FREE_TEXT) | frozenset(_IDENTIFYING_SEQUENCES)

_PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLES = 1_000_000  # enough for stable percentiles, fast on large radiographs
# pydicom's validation settings are process-wide; the lock keeps concurrent reads from
# restoring each other's settings halfway through.
_READ_LOCK = threading.Lock()
_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([YMWD]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"Y": 1.0, "": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


class DicomResult:
    """Decoded DICOM: display pixels plus the context and identifiers read from the header."""

    __slots__ = ("context", "identifiers", "pixels")

    def __init__(self, pixels: np.ndarray, context: StudyContext, identifiers: Identifiers):
        self.pixels = pixels
        self.context = context
        self.identifiers = identifiers


def read_dataset(data: bytes, *, force: bool = False) -> Dataset:
    """Parse a DICOM file from memory without pydicom logging any element value."""
    try:
        with _READ_LOCK, pydicom_config.disable_value_validation(), warnings.catch_warnings():
            # pydicom logs each warning as well; dropping the warnings.warn copy keeps
            # reads quiet without losing anything.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except Exception as exc:  # pydicom raises many types for malformed headers
        # The exception text may quote element values, so only its type is reported.
        raise CorruptImage(
            f"DICOM header cannot be parsed ({type(exc).__name__}); "
            "the file is damaged or truncated: re-export it from the PACS or modality"
        ) from exc
    if len(ds) == 0 and not force:
        # pydicom drops every element when the file ends mid-element (e.g. a cut upload).
        raise CorruptImage(
            "DICOM file has a header but no readable data elements: it is truncated or "
            "damaged; re-export it from the PACS or modality"
        )
    return ds


def decode_dicom(
    ds: Dataset, *, max_pixels: int, max_decode_bytes: int | None = None
) -> DicomResult:
    """Turn a parsed dataset into display-ready uint8 RGB (the middle frame if several).

    ``max_decode_bytes`` is the per-image memory budget (``medlens.io.limits``); None
    skips that check (callers that pass settings always give it)."""
    if not any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NoPixelData(
            f"this DICOM object has no pixel data (SOP class {_sop_class_name(ds)}); "
            "send the image series, not a report, plan or header-only object"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = max(1, get_nr_frames(ds, warn=False))
    except (AttributeError, TypeError, ValueError) as exc:
        raise CorruptImage(
            "DICOM image has no valid Rows/Columns/NumberOfFrames; the header is damaged: "
            "re-export the image from the PACS or modality"
        ) from exc
    if rows <= 0 or cols <= 0:
        raise CorruptImage(
            f"DICOM image declares {rows}x{cols} pixels; the header is damaged: "
            "re-export the image from the PACS or modality"
        )
    total = rows * cols * frames
    if total > max_pixels:
        raise ImageTooLarge(
            f"DICOM image is {cols}x{rows} pixels x {frames} frame(s) = {total:,} pixels, over "
            f"the limit of {max_pixels:,}; set MEDLENS_MAX_PIXELS to raise the limit"
        )
    check_aspect(cols, rows, "DICOM")
    if max_decode_bytes is not None:
        try:
            samples_declared = int(ds.get("SamplesPerPixel", 1) or 1)
            bits_allocated = int(ds.get("BitsAllocated", 16) or 16)
        except (TypeError, ValueError):
            samples_declared, bits_allocated = 1, 16
        need = estimate_dicom(
            rows, cols, samples=samples_declared, bits_allocated=max(8, min(bits_allocated, 64))
        )
        check_budget(need, max_decode_bytes, width=cols, height=rows, label="DICOM")

    index = frames // 2
    arr = _decode_frame(ds, index if frames > 1 else None)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 1 and arr.ndim == 3:  # a decoder returned all frames despite the index
        arr = arr[arr.shape[0] // 2]

    if photometric == "PALETTE COLOR":
        rgb = _palette_to_rgb(arr, ds)
    elif samples == 3:
        rgb = _colour_to_rgb(arr, ds)
    elif samples == 1:
        grey = _grey_to_uint8(arr, ds, index, photometric)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        raise UnsupportedImage(
            f"DICOM image has {samples} samples per pixel ({photometric or 'no photometric'}); "
            "MedLens reads greyscale, palette and 3-sample colour images"
        )
    if rgb.shape[:2] != (rows, cols):
        raise CorruptImage(
            f"decoded DICOM frame is {rgb.shape[1]}x{rgb.shape[0]}, header says {cols}x{rows}; "
            "re-export the image from the PACS or modality"
        )
    context = study_context(ds, width=cols, height=rows, frames=frames)
    return DicomResult(np.ascontiguousarray(rgb), context, extract_identifiers(ds))


def study_context(ds: Dataset, *, width: int, height: int, frames: int) -> StudyContext:
    """The loggable facts about a DICOM image; never reads an identifying element, a UID
    or free text (those go to ``extract_identifiers``)."""
    sex = _text(ds, "PatientSex")
    bits = ds.get("BitsStored")
    try:
        bits_stored = int(bits) if bits is not None else None
    except (TypeError, ValueError):
        bits_stored = None
    return StudyContext(
        source_format="dicom",
        width=width,
        height=height,
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        view=_text(ds, "ViewPosition"),
        age_years=parse_age(_text(ds, "PatientAge")),
        sex=sex.upper() if sex and sex.upper() in {"M", "F", "O"} else None,
        photometric=_text(ds, "PhotometricInterpretation"),
        bits_stored=bits_stored,
        frames=frames,
    )


def parse_age(value: str | None) -> float | None:
    """DICOM Age String ("045Y", "006M", "010W", "003D") in years; a bare number is years.

    Returns None for anything unparseable or over 150 years rather than guessing.
    """
    if not value:
        return None
    match = _AGE_RE.match(value)
    if match is None:
        return None
    years = int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]
    return round(years, 4) if years <= 150 else None


def extract_identifiers(ds: Dataset) -> Identifiers:
    """Non-empty identifying, free-text and instance-UID elements, as strings, kept out
    of the context."""
    values: dict[str, str] = {}
    for keyword in (*DIRECT_IDENTIFIERS, *FREE_TEXT, *UIDS):
        elem = ds.get(keyword)
        if elem is None:
            continue
        if isinstance(elem, MultiValue | list | tuple):
            text = "\\".join(str(v) for v in elem if str(v).strip())
        else:
            text = str(elem)
        text = text.strip()
        if text:
            values[keyword] = text
    return Identifiers(values)


def deidentify(ds: Dataset) -> Dataset:
    """A copy without direct identifiers, free text, identifying sequences or private tags.

    For sites that store files. Type 2 elements (PatientName, PatientID, ...) are kept
    empty so the object stays valid; everything else listed is deleted, in nested sequences
    too. UIDs, dates, age and sex are kept (they are needed to group and interpret images),
    and text burned into the pixels is not touched: this is not a full PS3.15 profile.
    """
    out = copy.deepcopy(ds)
    out.remove_private_tags()
    _strip(out)
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "MedLens deidentify: identifiers, free text, private tags"
    return out


def _strip(ds: Dataset) -> None:
    for elem in list(ds):
        keyword = elem.keyword
        if keyword in _REMOVE:
            if keyword in _BLANK_NOT_REMOVE:
                elem.value = ""
            else:
                del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                _strip(item)


def _decode_frame(ds: Dataset, index: int | None) -> np.ndarray:
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        ds.pixel_array_options(index=index)
        return np.asarray(ds.pixel_array)
    except NotImplementedError as exc:
        name = UID(str(tsyntax)).name if tsyntax else "unknown"
        raise UnsupportedImage(
            f"no decoder here for DICOM transfer syntax '{name}'; "
            "ask the sender for an uncompressed or JPEG/JPEG 2000/RLE-compressed export"
        ) from exc
    except Exception as exc:  # decoders raise ValueError, RuntimeError, OSError, ...
        codec_error = _codec_error(ds, tsyntax, exc)
        if codec_error is not None:
            raise codec_error from exc
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CorruptImage(
            f"DICOM pixel data cannot be decoded ({reason}); "
            "the file is damaged or truncated: re-export it from the PACS or modality"
        ) from exc


# What pydicom's plugins say when they cannot handle an encoding at all, and what a decoder
# says when a stream breaks a rule it enforces but other decoders tolerate (pylibjpeg-libjpeg
# on the non-zero scan start of some 12-bit JPEG Extended encoders, e.g. pydicom's
# JPEG-lossy.dcm). Neither means the file is damaged; each names the codec.
_UNSUPPORTED = re.compile(r"does not support|not installed|no (?:available )?plugin", re.I)
_STRICT = re.compile(r"scan start must be zero and scan stop must be 63", re.I)
_PLUGIN_LINE = re.compile(r"^\s*([\w-]+): (.+)$")
_PLUGIN_PACKAGE = {
    "pylibjpeg": "pylibjpeg-libjpeg",
    "pillow": "Pillow",
    "gdcm": "GDCM (python-gdcm)",
}


def _codec_error(ds: Dataset, tsyntax: object, exc: Exception) -> UnsupportedImage | None:
    """An honest UnsupportedImage when every installed decoder declined the encoding or
    rejected a non-conformant (not damaged) stream; None when one reported damage (a
    stream out of sync, a cut marker), which stays CorruptImage."""
    lines = [m.groups() for m in map(_PLUGIN_LINE.match, str(exc).splitlines()) if m]
    if not lines or not all(_UNSUPPORTED.search(msg) or _STRICT.search(msg) for _, msg in lines):
        return None
    name = UID(str(tsyntax)).name if tsyntax else "unknown"
    bits = ds.get("BitsStored")
    what = f"'{name}'" + (f" with {bits}-bit samples" if bits else "")
    said = "; ".join(
        f"{_PLUGIN_PACKAGE.get(p, p)}: "
        + (
            "rejects this stream's scan header (not standard for sequential JPEG)"
            if _STRICT.search(msg)
            else "does not decode this encoding"
        )
        for p, msg in lines
    )
    return UnsupportedImage(
        f"no installed DICOM decoder can read this {what} pixel data ({said}); the file is "
        "not necessarily damaged: decompress it (DCMTK dcmdjpeg, or the PACS's "
        "uncompressed export) and send that"
    )


def _grey_to_uint8(arr: np.ndarray, ds: Dataset, index: int, photometric: str) -> np.ndarray:
    values = _modality(arr, ds, index)
    unit = _voi(values, ds, index)
    if unit is None:
        unit = _default_window(arr, values, ds)
    inverse = str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        unit = 1.0 - unit
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def _modality(arr: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds)
    slope, intercept = _rescale(ds, index)
    if slope == 1.0 and intercept == 0.0:
        return arr
    return arr.astype(np.float64) * slope + intercept


def _rescale(ds: Dataset, index: int) -> tuple[float, float]:
    source: Dataset | None = ds if "RescaleSlope" in ds else None
    if source is None:
        source = _functional_group(ds, "PixelValueTransformationSequence", index)
    if source is None:
        return 1.0, 0.0
    try:
        return float(source.get("RescaleSlope", 1.0)), float(source.get("RescaleIntercept", 0.0))
    except (TypeError, ValueError):
        return 1.0, 0.0


def _voi(values: np.ndarray, ds: Dataset, index: int) -> np.ndarray | None:
    """Stored VOI as a [0, 1] float image, or None when there is none usable."""
    if ds.get("VOILUTSequence"):
        unit = _voi_lut(values, ds)
    else:
        source = ds if "WindowCenter" in ds else None
        if source is None:
            source = _functional_group(ds, "FrameVOILUTSequence", index)
        unit = _window(values, source) if source is not None else None
    if unit is None or (np.ptp(unit) == 0 and np.ptp(values) != 0):
        return None  # a window that flattens a frame with content is worse than none
    return unit


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    try:
        item = ds.VOILUTSequence[0]
        entries = int(item.LUTDescriptor[0]) or 2**16
        first = int(item.LUTDescriptor[1])
        ints = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
        mapped = apply_voi(ints, ds).astype(np.float64)
    except Exception:  # malformed LUT: fall back to the window or the percentile
        return None
    lo, hi = float(table.min()), float(table.max())
    return (mapped - lo) / (hi - lo) if hi > lo else None


def _window(values: np.ndarray, source: Dataset) -> np.ndarray | None:
    try:
        center = float(_first(source.get("WindowCenter")))
        width = float(_first(source.get("WindowWidth")))
    except (TypeError, ValueError, IndexError):
        return None
    func = str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    x = values.astype(np.float64)
    if func == "SIGMOID" and width > 0:
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if func == "LINEAR" and width > 1:  # PS3.3 C.11.2.1.2.1
        return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    if width > 0:  # LINEAR_EXACT, or LINEAR with width 1 where the formula divides by 0
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    return None


def _default_window(raw: np.ndarray, values: np.ndarray, ds: Dataset) -> np.ndarray:
    bits = int(ds.get("BitsStored", 0) or 0)
    if 0 < bits <= 8 and values is raw and raw.dtype.kind in "iu":
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo, hi = 0, 2**bits - 1
        return (raw.astype(np.float64) - lo) / (hi - lo)
    return percentile_window(values)


def percentile_window(values: np.ndarray) -> np.ndarray:
    """Map the 0.5-99.5 % range of `values` to [0, 1] (min-max if that range is empty)."""
    x = values.astype(np.float64)
    finite = x[np.isfinite(x)] if x.dtype.kind == "f" else x.ravel()
    if finite.size == 0:
        return np.zeros(x.shape)
    step = max(1, finite.size // _PERCENTILE_SAMPLES)
    lo, hi = (float(v) for v in np.percentile(finite[::step], _PERCENTILES))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(x.shape)
    return np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def _colour_to_rgb(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    # pydicom's default processing already turned YBR_FULL / YBR_FULL_422 into RGB and
    # the JPEG 2000 decoders undo YBR_ICT / YBR_RCT.
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise CorruptImage(
            f"DICOM colour frame decoded to shape {arr.shape}, expected (rows, columns, 3); "
            "re-export the image from the PACS or modality"
        )
    if arr.dtype == np.uint8:
        return arr
    bits = int(ds.get("BitsStored", 16) or 16)
    scale = 255.0 / float(2**bits - 1)
    return np.rint(np.clip(arr.astype(np.float64) * scale, 0, 255)).astype(np.uint8)


def _palette_to_rgb(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    try:
        rgb = apply_color_lut(arr, ds)
    except Exception as exc:
        raise CorruptImage(
            f"DICOM palette colour lookup table is unusable ({type(exc).__name__}); "
            "re-export the image as RGB"
        ) from exc
    if rgb.dtype == np.uint8:
        return rgb
    top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "iu" else 1.0
    return np.rint(np.clip(rgb.astype(np.float64) / top, 0, 1) * 255).astype(np.uint8)


def _functional_group(ds: Dataset, keyword: str, index: int) -> Dataset | None:
    """First item of `keyword` for frame `index`, per-frame groups before shared ones."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    candidates: list[Dataset] = []
    if per_frame and len(per_frame) > index:
        candidates.append(per_frame[index])
    if shared:
        candidates.append(shared[0])
    for group in candidates:
        seq = group.get(keyword)
        if seq:
            return seq[0]
    return None


def _first(value: object) -> object:
    if isinstance(value, MultiValue | list | tuple):
        return value[0]
    return value


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else ""
    text = str(value).strip()
    return text or None


def _sop_class_name(ds: Dataset) -> str:
    uid = str(ds.get("SOPClassUID", "") or "").strip()
    if not uid:
        return "not stated"
    name = UID(uid).name
    return name if name != uid else uid

"""medlens.io on real files: sample radiographs and skin photos, pydicom's DICOM test set,
and broken inputs built from them (medlens.io.badinputs)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medlens.errors import (
    CorruptImage,
    EmptyInput,
    ExtremeAspectRatio,
    ImageTooLarge,
    InputError,
    MedLensError,
    NoPixelData,
    UnsupportedImage,
)
from medlens.io import DecodedImage, load_image
from medlens.io import badinputs as bad
from medlens.io.dicom import (
    DIRECT_IDENTIFIERS,
    FREE_TEXT,
    UIDS,
    deidentify,
    extract_identifiers,
    parse_age,
)
from medlens.io.images import describe_content, sniff_format

# ---------------------------------------------------------------------------- helpers


def dicom_file(name: str) -> Path:
    """A file from pydicom's offline test data (pydicom or pydicom-data); never downloads."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed locally"
    return Path(path)


def check_rgb(decoded: DecodedImage) -> np.ndarray:
    """Every decode must honour the contract: uint8 (H, W, 3), matching the context."""
    px = decoded.pixels
    assert px.dtype == np.uint8
    assert px.ndim == 3 and px.shape[2] == 3
    assert px.flags.c_contiguous
    assert (decoded.context.height, decoded.context.width) == px.shape[:2]
    assert len(decoded.content_hash) == 64
    return px


def grey(px: np.ndarray) -> np.ndarray:
    """The single channel of a greyscale decode (asserting all three are equal)."""
    assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 0], px[..., 2])
    return px[..., 0]


def assert_order_preserving(display: np.ndarray, raw: np.ndarray) -> None:
    """A display mapping must never swap the order of two stored values."""
    order = np.argsort(raw.ravel(), kind="stable")
    assert np.all(np.diff(display.ravel()[order].astype(int)) >= 0)


@pytest.fixture(scope="module")
def samples(data_dir: Path) -> bad.SampleFiles:
    return bad.sample_files(data_dir)


@pytest.fixture(scope="module")
def built(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder with every bad input (the PNG bomb takes ~0.3 s, so build once)."""
    out = tmp_path_factory.mktemp("bad")
    bad.build_all(data_dir, out)
    return out


# ------------------------------------------------------------- plain image formats


def test_greyscale_png_radiograph(samples: bad.SampleFiles) -> None:
    decoded = load_image(samples.cxr_png)
    px = check_rgb(decoded)
    original = np.asarray(Image.open(samples.cxr_png))
    assert original.ndim == 2  # stored as mode L
    assert np.array_equal(grey(px), original)
    ctx = decoded.context
    assert (ctx.source_format, ctx.width, ctx.height, ctx.frames) == ("png", 512, 512, 1)
    assert ctx.modality is None and not decoded.identifiers
    assert decoded.content_hash == hashlib.sha256(samples.cxr_png.read_bytes()).hexdigest()


def test_skin_jpeg_from_path_and_bytes_agree(samples: bad.SampleFiles) -> None:
    raw = samples.skin_jpeg.read_bytes()
    from_path = load_image(samples.skin_jpeg)
    from_bytes = load_image(raw)
    assert np.array_equal(check_rgb(from_path), check_rgb(from_bytes))
    assert np.array_equal(
        from_path.pixels, np.asarray(Image.open(samples.skin_jpeg).convert("RGB"))
    )
    assert from_path.content_hash == from_bytes.content_hash == hashlib.sha256(raw).hexdigest()
    assert from_path.context.source_format == "jpeg"


def test_format_comes_from_magic_bytes_not_the_name(
    samples: bad.SampleFiles, tmp_path: Path
) -> None:
    misnamed = tmp_path / "photo.jpg"
    misnamed.write_bytes(samples.cxr_png.read_bytes())
    decoded = load_image(misnamed)
    assert decoded.context.source_format == "png"
    assert np.array_equal(grey(decoded.pixels), np.asarray(Image.open(samples.cxr_png)))


@pytest.mark.parametrize(
    ("fmt", "save_kwargs"),
    [
        ("webp", {"format": "WEBP", "lossless": True}),
        ("bmp", {"format": "BMP"}),
        ("tiff", {"format": "TIFF", "compression": "tiff_lzw"}),
        ("png", {"format": "PNG"}),
    ],
)
def test_lossless_round_trips(
    samples: bad.SampleFiles, tmp_path: Path, fmt: str, save_kwargs: dict
) -> None:
    rgb = Image.open(samples.skin_jpeg).convert("RGB")
    path = tmp_path / f"skin.{fmt}"
    rgb.save(path, **save_kwargs)
    assert sniff_format(path.read_bytes()) == fmt
    decoded = load_image(path)
    assert decoded.context.source_format == fmt
    assert np.array_equal(check_rgb(decoded), np.asarray(rgb))


def test_exif_orientation_is_applied(samples: bad.SampleFiles, tmp_path: Path) -> None:
    path = bad.exif_rotated_jpeg(samples.cxr_jpeg, tmp_path, orientation=6)
    stored = np.asarray(Image.open(path).convert("RGB"))  # as stored, not rotated
    decoded = load_image(path)
    px = check_rgb(decoded)
    assert stored.shape[:2] == (885, 1036)
    assert px.shape[:2] == (1036, 885)  # width and height swapped
    assert (decoded.context.width, decoded.context.height) == (885, 1036)
    assert np.array_equal(px, np.rot90(stored, k=-1))  # orientation 6 = turn 90° clockwise


def test_transparency_is_flattened_on_white(samples: bad.SampleFiles, tmp_path: Path) -> None:
    path = bad.rgba_png(samples.skin_jpeg, tmp_path)
    px = check_rgb(load_image(path))
    original = np.asarray(Image.open(samples.skin_jpeg).convert("RGB"))
    half = px.shape[1] // 2
    assert np.all(px[:, :half] == 255)  # fully transparent -> white
    assert np.array_equal(px[:, half:], original[:, half:])  # opaque -> unchanged


def test_greyscale_with_alpha_and_palette_png(samples: bad.SampleFiles, tmp_path: Path) -> None:
    cxr = Image.open(samples.cxr_png)
    la = cxr.convert("LA")
    la.putalpha(128)
    la.save(tmp_path / "la.png")
    expected = np.rint(np.asarray(cxr).astype(float) * 128 / 255 + 255 * 127 / 255)
    got = grey(check_rgb(load_image(tmp_path / "la.png"))).astype(float)
    assert np.abs(got - expected).max() <= 1

    palette = Image.open(samples.skin_jpeg).convert("RGB").convert("P", palette=Image.ADAPTIVE)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(
        check_rgb(load_image(tmp_path / "p.png")), np.asarray(palette.convert("RGB"))
    )


def test_cmyk_jpeg_is_converted_to_rgb(samples: bad.SampleFiles, tmp_path: Path) -> None:
    path = bad.cmyk_jpeg(samples.skin_jpeg, tmp_path)
    assert Image.open(path).mode == "CMYK"
    px = check_rgb(load_image(path)).astype(int)
    original = np.asarray(Image.open(samples.skin_jpeg).convert("RGB")).astype(int)
    # JPEG re-encoding costs a little; inverted or channel-swapped CMYK would be far off.
    assert np.abs(px - original).mean() < 2.0


def test_16bit_png_is_scaled_by_its_range_not_clipped(
    samples: bad.SampleFiles, tmp_path: Path
) -> None:
    path = bad.png_16bit(samples.cxr_png, tmp_path)
    assert Image.open(path).mode in {"I;16", "I"}
    original = np.asarray(Image.open(samples.cxr_png)).astype(int)
    assert (original.min(), original.max()) == (0, 255)
    assert np.abs(grey(check_rgb(load_image(path))).astype(int) - original).max() <= 1

    # Same image in a 12-bit range (x16, max 4080): clipping at 255 would saturate most
    # of it; min-max scaling gives the original back.
    twelve = tmp_path / "cxr12.png"
    Image.fromarray((original * 16).astype(np.uint16)).save(twelve)
    assert np.abs(grey(load_image(twelve).pixels).astype(int) - original).max() <= 1


def test_float_tiff_is_scaled_by_its_range(samples: bad.SampleFiles, tmp_path: Path) -> None:
    original = np.asarray(Image.open(samples.cxr_png)).astype(np.float32)
    path = tmp_path / "cxr_float.tif"
    Image.fromarray(original / 255.0 * 3.5 - 1.0).save(path)
    got = grey(check_rgb(load_image(path))).astype(int)
    assert np.abs(got - original.astype(int)).max() <= 1


# ---------------------------------------------------------------------------- DICOM


def test_dicom_chest_radiograph_context(samples: bad.SampleFiles) -> None:
    decoded = load_image(samples.cxr_dicom)
    ds = pydicom.dcmread(samples.cxr_dicom)
    px = check_rgb(decoded)
    # 8-bit, no stored window, no rescale: shown over its stored range, unchanged.
    assert np.array_equal(grey(px), ds.pixel_array)
    ctx = decoded.context
    assert ctx.source_format == "dicom"
    assert (ctx.modality, ctx.body_part, ctx.view) == ("CR", "CHEST", "PA")
    assert (ctx.width, ctx.height, ctx.frames, ctx.bits_stored) == (1024, 1024, 1, 8)
    assert (ctx.age_years, ctx.sex, ctx.photometric) == (62.0, "M", "MONOCHROME2")
    # UIDs link the image to the patient's record: identifiers, never the context.
    ids = decoded.identifiers
    assert ids.study_uid == ds.StudyInstanceUID and ids.series_uid == ds.SeriesInstanceUID
    assert ctx.study_uid is None and ctx.series_uid is None
    assert not {"study_uid", "series_uid"} & set(ctx.to_dict())
    shown = repr(ctx) + json.dumps(ctx.to_dict()) + repr(decoded)
    assert str(ds.StudyInstanceUID) not in shown and str(ds.SeriesInstanceUID) not in shown


def test_monochrome1_is_inverted_so_bone_is_bright(samples: bad.SampleFiles) -> None:
    mono1 = pydicom.dcmread(samples.cxr_dicom_mono1)
    mono2 = pydicom.dcmread(samples.cxr_dicom)
    assert mono1.PhotometricInterpretation == "MONOCHROME1"
    stored = mono1.pixel_array
    assert np.array_equal(stored, mono2.pixel_array)  # same stored values, opposite meaning

    shown1 = grey(check_rgb(load_image(samples.cxr_dicom_mono1)))
    shown2 = grey(load_image(samples.cxr_dicom).pixels)
    assert np.array_equal(shown1.astype(int), 255 - shown2.astype(int))
    assert np.array_equal(shown1.astype(int), 255 - stored.astype(int))
    # High stored values mean dark in MONOCHROME1: they must be shown dark.
    assert shown1[stored > 200].mean() < 60 < shown1[stored < 50].mean()


def test_ct_rescale_then_percentile_window() -> None:
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024.0
    shown = grey(check_rgb(load_image(path)))
    assert_order_preserving(shown, ds.pixel_array)
    assert shown.min() == 0 and shown.max() == 255
    # A 0.5-99.5 % window saturates about 0.5 % at each end (a few more with ties).
    assert (shown == 255).mean() < 0.02 and (shown == 0).mean() < 0.02


def test_mr_stored_window_is_applied() -> None:
    path = dicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(float)
    shown = grey(check_rgb(load_image(path))).astype(float)
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window.
    expected = np.clip((raw - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    assert np.abs(shown - expected).max() <= 0.5 + 1e-9
    assert shown[raw > center + width / 2].min() == 255  # above the window: white


@pytest.mark.parametrize(
    ("reference", "compressed"),
    [
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
        ("SC_rgb.dcm", "SC_rgb_rle.dcm"),
    ],
)
def test_lossless_transfer_syntaxes_match_uncompressed(reference: str, compressed: str) -> None:
    a = check_rgb(load_image(dicom_file(reference)))
    b = check_rgb(load_image(dicom_file(compressed)))
    assert np.array_equal(a, b)


def test_jpeg2000_signed_16bit() -> None:
    path = dicom_file("JPEG2000.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1 and ds.BitsStored == 16
    decoded = load_image(path)
    shown = grey(check_rgb(decoded))
    assert shown.shape == (1024, 256) and decoded.context.bits_stored == 16
    assert_order_preserving(shown, ds.pixel_array)
    assert shown.std() > 10


def test_ybr_colour_dicom_becomes_rgb() -> None:
    rgb = check_rgb(load_image(dicom_file("SC_rgb.dcm"))).astype(int)
    for name in ("SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        decoded = load_image(dicom_file(name))
        assert decoded.context.photometric == "YBR_FULL"
        diff = np.abs(check_rgb(decoded).astype(int) - rgb)
        assert diff.mean() < 1.5 and diff.max() <= 8  # YCbCr rounding, not swapped channels


def test_palette_colour_dicom() -> None:
    decoded = load_image(dicom_file("OBXXXX1A.dcm"))
    px = check_rgb(decoded)
    assert decoded.context.photometric == "PALETTE COLOR" and px.shape == (600, 800, 3)
    assert not np.array_equal(px[..., 0], px[..., 2])  # colour, not grey


def test_multiframe_shows_the_middle_frame() -> None:
    path = dicom_file("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array
    assert frames.shape[0] == 10
    decoded = load_image(path)
    assert decoded.context.frames == 10
    shown = grey(check_rgb(decoded))
    assert_order_preserving(shown, frames[5])
    with pytest.raises(AssertionError):
        assert_order_preserving(shown, frames[0])


def test_dicom_without_preamble(tmp_path: Path) -> None:
    path = dicom_file("CT_small.dcm")
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    bare = raw[132:]  # starts at the file meta group, no preamble
    expected = load_image(path).pixels
    assert np.array_equal(load_image(bare, filename="ct.dcm").pixels, expected)
    assert np.array_equal(load_image(bare).pixels, expected)  # group 0002 tag recognised
    (tmp_path / "bare.dcm").write_bytes(bare)
    assert load_image(tmp_path / "bare.dcm").context.modality == "CT"


def test_text_named_dcm_is_unsupported(samples: bad.SampleFiles, tmp_path: Path) -> None:
    path = tmp_path / "scan.dcm"
    path.write_bytes(samples.text.read_bytes()[:2000])
    with pytest.raises(UnsupportedImage, match="looks like text"):
        load_image(path)


def test_no_pixel_data() -> None:
    with pytest.raises(NoPixelData) as info:
        load_image(dicom_file("rtplan.dcm"))
    assert "RT Plan Storage" in str(info.value)
    assert "send the image series" in str(info.value)


@pytest.mark.parametrize(
    ("value", "years"),
    [
        ("045Y", 45.0),
        ("006M", 0.5),
        ("010W", round(70 / 365.25, 4)),
        ("003D", round(3 / 365.25, 4)),
        ("62", 62.0),
        ("", None),
        (None, None),
        ("abc", None),
        ("4 5Y", None),
        ("999Y", None),
    ],
)
def test_parse_age(value: str | None, years: float | None) -> None:
    assert parse_age(value) == years


# ---------------------------------------------------------------------- identifiers


@pytest.mark.parametrize("name", ["CT_small.dcm", "cxr"])
def test_identifiers_are_kept_apart(
    name: str, samples: bad.SampleFiles, caplog: pytest.LogCaptureFixture
) -> None:
    path = samples.cxr_dicom if name == "cxr" else dicom_file(name)
    ds = pydicom.dcmread(path)
    patient = str(ds.PatientName)
    assert len(patient) > 5
    caplog.set_level(logging.DEBUG)
    decoded = load_image(path)
    assert decoded.identifiers.values["PatientName"] == patient
    assert decoded.identifiers.values["PatientID"] == str(ds.PatientID)
    secrets = [v for v in decoded.identifiers.values.values() if len(v) > 3]
    assert secrets
    shown = [
        repr(decoded),
        str(decoded),
        repr(decoded.context),
        str(decoded.context.to_dict()),
        repr(decoded.identifiers),
        str(decoded.identifiers),
        caplog.text,
    ]
    for secret in secrets:
        assert not any(secret in text for text in shown), "an identifier leaked"


def test_identifier_keywords_are_real_dicom_keywords() -> None:
    for keyword in (*DIRECT_IDENTIFIERS, *FREE_TEXT, *UIDS):
        assert pydicom.datadict.tag_for_keyword(keyword) is not None, keyword


def test_deidentify_removes_identifiers_and_keeps_pixels(tmp_path: Path) -> None:
    original = pydicom.dcmread(dicom_file("CT_small.dcm"))
    # A nested copy of an identifier, as requests and references carry them.
    item = Dataset()
    item.AccessionNumber = "NESTED-ACC-123"
    item.RequestedProcedureDescription = "free text about the patient"
    original.RequestAttributesSequence = Sequence([item])
    before = extract_identifiers(original).values
    assert {"PatientName", "PatientID", "InstitutionName", "StudyDescription"} <= set(before)

    clean = deidentify(original)
    assert str(original.PatientName) == before["PatientName"]  # input untouched
    # Only the instance UIDs are left: deidentify keeps them (files need them to group).
    assert set(extract_identifiers(clean).values) <= set(UIDS)
    assert str(clean.PatientName) == "" and "PatientName" in clean  # Type 2: kept, empty
    assert "InstitutionName" not in clean and "StudyDescription" not in clean
    nested = clean.RequestAttributesSequence[0]
    assert nested.AccessionNumber == "" and "RequestedProcedureDescription" not in nested
    assert not any(elem.tag.is_private for elem in clean)
    assert any(elem.tag.is_private for elem in original)
    assert clean.PatientIdentityRemoved == "YES"
    assert clean.StudyInstanceUID == original.StudyInstanceUID

    out = tmp_path / "clean.dcm"
    clean.save_as(out)
    written = out.read_bytes()
    for keyword, value in before.items():
        assert keyword in UIDS or value.encode() not in written
    reloaded = load_image(out)
    assert set(reloaded.identifiers.values) <= set(UIDS)
    assert np.array_equal(reloaded.pixels, load_image(dicom_file("CT_small.dcm")).pixels)


# ----------------------------------------------------------------------- bad inputs


def test_truncated_jpeg_is_corrupt(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CorruptImage, match="truncated"):
        load_image(built / "truncated.jpg")
    # Even when other code told Pillow to accept truncated files, MedLens does not.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(CorruptImage):
        load_image(built / "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and the global is restored


def test_12_bit_jpeg_extended_decodes() -> None:
    """pydicom's 12-bit JPEG Extended (Process 2 and 4) file: pylibjpeg-libjpeg decodes
    it; the 12 stored bits are windowed like any other greyscale image."""
    path = dicom_file("JPGExtended.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGExtended12Bit
    decoded = load_image(path)
    px = grey(check_rgb(decoded))
    assert decoded.context.bits_stored == 12 and px.shape == (ds.Rows, ds.Columns)
    assert_order_preserving(px, ds.pixel_array)
    assert px.max() > 200 and px.min() < 50  # a real image, not a flat frame


def test_jpeg_extended_no_codec_accepts_is_unsupported_not_damaged() -> None:
    """Issue 13: pydicom's JPEG-lossy.dcm (12-bit JPEG Extended whose scan header
    pylibjpeg-libjpeg rejects, and which Pillow and GDCM do not decode at 12 bits) was
    called "damaged or truncated". It is an encoding no installed codec reads: the error
    says so and names the codecs."""
    path = dicom_file("JPEG-lossy.dcm")
    try:
        decoded = load_image(path)  # a site with a codec that accepts it: must decode
    except UnsupportedImage as exc:
        message = str(exc)
        assert "JPEG Extended" in message and "12-bit" in message
        assert "pylibjpeg-libjpeg" in message and "Pillow" in message
        assert "damaged or truncated" not in message and "not necessarily damaged" in message
        assert not isinstance(exc, CorruptImage)
    else:
        assert check_rgb(decoded).shape[:2] == (decoded.context.height, decoded.context.width)


def test_damaged_jpeg_extended_stream_is_still_corrupt(tmp_path: Path) -> None:
    """The codec message above is for encodings; a stream garbled in transit (here: entropy-
    coded data overwritten) is still CorruptImage."""
    from pydicom.encaps import encapsulate, generate_fragments

    ds = pydicom.dcmread(dicom_file("JPGExtended.dcm"))
    stream = b"".join(generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([stream[:600] + bytes(range(256)) * 4 + stream[1624:]])
    ds.save_as(tmp_path / "garbled.dcm")
    with pytest.raises(CorruptImage, match="damaged"):
        load_image(tmp_path / "garbled.dcm")


def test_truncated_dicom_is_corrupt(built: Path) -> None:
    with pytest.raises(CorruptImage):
        load_image(built / "truncated.dcm")


def test_empty_input(built: Path) -> None:
    with pytest.raises(EmptyInput):
        load_image(built / "empty.png")
    with pytest.raises(EmptyInput):
        load_image(b"")


def test_text_named_png(built: Path) -> None:
    with pytest.raises(UnsupportedImage) as info:
        load_image(built / "labels.png")
    message = str(info.value)
    assert "looks like text" in message and "file name says .png" in message
    assert "PNG, JPEG, BMP, TIFF, WebP, DICOM" in message


def test_png_bomb_refused_before_decoding(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = built / "bomb.png"
    assert path.stat().st_size < 200_000
    pil_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLarge) as info:
        load_image(path)
    assert "30000x30000" in str(info.value) and "MEDLENS_MAX_PIXELS" in str(info.value)
    assert pil_limit == Image.MAX_IMAGE_PIXELS
    # MEDLENS_MAX_PIXELS is the limit that counts (a 512x512 image is 262,144 pixels).
    monkeypatch.setenv("MEDLENS_MAX_PIXELS", "300000")
    check_rgb(load_image(built / "cxr16.png"))
    monkeypatch.setenv("MEDLENS_MAX_PIXELS", "200000")
    with pytest.raises(ImageTooLarge, match="over the limit of 200,000"):
        load_image(built / "cxr16.png")


def test_our_pixel_limit_governs_not_pillows_global(
    samples: bad.SampleFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert check_rgb(load_image(samples.cxr_png)).shape == (512, 512, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ImageTooLarge, match="512x512"):
        load_image(samples.cxr_png, max_pixels=512 * 512 - 1)


def test_dicom_pixel_limit_counts_frames(samples: bad.SampleFiles) -> None:
    with pytest.raises(ImageTooLarge, match="1024x1024"):
        load_image(samples.cxr_dicom, max_pixels=1_000_000)
    with pytest.raises(ImageTooLarge, match="10 frame"):
        load_image(dicom_file("emri_small.dcm"), max_pixels=64 * 64 * 9)


def test_byte_limit(samples: bad.SampleFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ImageTooLarge, match="MEDLENS_MAX_BYTES"):
        load_image(samples.cxr_png, max_bytes=1000)
    monkeypatch.setenv("MEDLENS_MAX_BYTES", "1000")
    with pytest.raises(ImageTooLarge):
        load_image(samples.skin_jpeg.read_bytes())


def test_dicom_without_pixels_built(built: Path) -> None:
    with pytest.raises(NoPixelData, match="Secondary Capture Image Storage"):
        load_image(built / "no_pixels.dcm")


def test_missing_path_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="folder"):
        load_image(tmp_path)


def test_other_formats_are_named(samples: bad.SampleFiles, tmp_path: Path) -> None:
    gif = tmp_path / "skin.gif"
    Image.open(samples.skin_jpeg).save(gif)
    with pytest.raises(UnsupportedImage, match="looks like a GIF image"):
        load_image(gif)
    assert describe_content(samples.skin_jpeg.read_bytes()[2:]).startswith("unrecognised binary")
    assert describe_content(b'{"a": 1}') == "JSON text"


BAD_FILES = {
    "truncated.jpg": CorruptImage,
    "truncated.dcm": CorruptImage,
    "empty.png": EmptyInput,
    "labels.png": UnsupportedImage,
    "bomb.png": ImageTooLarge,
    "strip_1x20000.png": ExtremeAspectRatio,
    "strip_1x400000.png": ExtremeAspectRatio,
    "no_pixels.dcm": NoPixelData,
}


@pytest.mark.parametrize(("name", "error"), sorted(BAD_FILES.items()))
def test_error_messages_are_one_helpful_line(
    built: Path, tmp_path: Path, name: str, error: type[MedLensError]
) -> None:
    named = tmp_path / f"Doe_Jane_{name}"  # file names can carry patient names
    named.write_bytes((built / name).read_bytes())
    with pytest.raises(error) as info:
        load_image(named)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 300
    assert "Doe" not in message and "Jane" not in message
    hints = (
        "re-export", "re-send", "check the upload", "supported formats", "MEDLENS_MAX", "send",
        "crop it",
    )  # fmt: skip
    assert any(hint in message for hint in hints), message


def test_every_builder_output_is_handled(built: Path) -> None:
    """Nothing built from real data escapes as anything but a MedLensError or an image."""
    for path in sorted(built.iterdir()):
        with contextlib.suppress(MedLensError):
            check_rgb(load_image(path))


def test_bad_input_table_script(samples: bad.SampleFiles, tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bad_input_table.py"
    spec = importlib.util.spec_from_file_location("bad_input_table", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bad.md"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert module.main(["--out", str(out)]) == 0
    table = out.read_text()
    assert table == buffer.getvalue()
    assert "`CorruptImage`" in table and "`ImageTooLarge`" in table and "decoded 512x512" in table
    inputs = table.split("## Memory budget")[0]
    assert inputs.count("\n| ") == 13  # header + 12 inputs
    assert "`ExtremeAspectRatio`" in table


# ------------------------------------------------- decoding limits (shape and memory)

# sha256 of the decoded pixels of real sample files, computed with the decoder as it was
# before the aspect-ratio and memory limits (issue 13): the limits must not move a pixel.
BEFORE_LIMITS = {
    "skin_jpeg": "6c01924acc67fb6a",
    "cxr_jpeg": "d82f43b76ae77ca2",
    "cxr_png": "7813711c4f470804",
    "cxr_dicom": "fc2ae18a1acc217c",
    "cxr_dicom_mono1": "e683423b9f310146",
}


@pytest.mark.parametrize("name", sorted(BEFORE_LIMITS))
def test_sample_files_decode_as_before_the_limits(samples: bad.SampleFiles, name: str) -> None:
    path = getattr(samples, name)
    decoded = load_image(path)
    px = check_rgb(decoded)
    assert decoded.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashlib.sha256(px.tobytes()).hexdigest()[:16] == BEFORE_LIMITS[name]


def test_16bit_and_float_paths_decode_as_before(samples: bad.SampleFiles, tmp_path: Path) -> None:
    """The chunked high-depth scaling gives the 8-bit radiograph back, as before."""
    wide = load_image(bad.png_16bit(samples.cxr_png, tmp_path)).pixels
    assert hashlib.sha256(wide.tobytes()).hexdigest()[:16] == BEFORE_LIMITS["cxr_png"]
    grey8 = np.asarray(Image.open(samples.cxr_png).convert("L"), dtype=np.float32)
    Image.fromarray(grey8 / 7.0 - 3.0).save(tmp_path / "float.tif")  # mode F, affine
    floats = load_image(tmp_path / "float.tif").pixels
    assert hashlib.sha256(floats.tobytes()).hexdigest()[:16] == BEFORE_LIMITS["cxr_png"]


def test_chunked_scaling_matches_one_pass() -> None:
    from medlens.io.images import scale_to_uint8

    rng = np.random.default_rng(7)
    x = rng.normal(100.0, 40.0, size=(1900, 1300)).astype(np.float32)  # > 2 blocks
    x[5, 7], x[1800, 3], x[900, 1299] = np.nan, np.inf, -np.inf
    x64 = x.astype(np.float64)
    finite = np.isfinite(x64)
    lo, hi = float(x64[finite].min()), float(x64[finite].max())
    expected = np.rint((np.where(finite, x64, lo) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    assert np.array_equal(scale_to_uint8(x), expected)
    assert not scale_to_uint8(np.full((3, 3), 7.0)).any()
    assert not scale_to_uint8(np.full((3, 3), np.nan)).any()


@pytest.mark.parametrize("size", [(1, 20000), (1, 400000), (400000, 1), (21, 1)])
def test_extreme_aspect_ratio_is_refused(tmp_path: Path, size: tuple[int, int]) -> None:
    path = bad.strip_png(tmp_path, *size)
    assert path.stat().st_size < 2000  # tiny on disk, under every byte and pixel limit
    with pytest.raises(ExtremeAspectRatio, match=r"over the limit of 20:1; crop it") as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_aspect_ratio_bound_is_inclusive(tmp_path: Path) -> None:
    check_rgb(load_image(bad.strip_png(tmp_path, 20, 400)))  # exactly 20:1 is accepted
    with pytest.raises(ExtremeAspectRatio):
        load_image(bad.strip_png(tmp_path, 20, 401))


def test_extreme_aspect_ratio_dicom_is_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 2, 2 * 128 * 128 // 2  # same pixel bytes, 1:8192
    ds.save_as(tmp_path / "strip.dcm")
    with pytest.raises(ExtremeAspectRatio, match="DICOM image is 16384x2"):
        load_image(tmp_path / "strip.dcm")


def test_memory_budget_refuses_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (4000, 3000), (10, 20, 30)).save(path)  # ~37 KB, 12 Mpx
    monkeypatch.setenv("MEDLENS_MAX_DECODE_BYTES", str(64 * 2**20))
    with pytest.raises(ImageTooLarge, match="per-image memory budget of 64 MiB") as info:
        load_image(path)
    assert "MEDLENS_MAX_DECODE_BYTES" in str(info.value)
    monkeypatch.delenv("MEDLENS_MAX_DECODE_BYTES")
    assert check_rgb(load_image(path)).shape == (3000, 4000, 3)  # within the default budget
    # The budget is passed down like max_pixels (the pipeline gives its settings' value).
    with pytest.raises(ImageTooLarge):
        load_image(path, max_decode_bytes=64 * 2**20)


def test_memory_budget_applies_to_dicom(samples: bad.SampleFiles) -> None:
    with pytest.raises(ImageTooLarge, match="DICOM image of 1024x1024 pixels needs about"):
        load_image(samples.cxr_dicom, max_decode_bytes=40 * 2**20)


def test_large_jpeg_is_decoded_at_reduced_scale_within_the_budget(
    samples: bad.SampleFiles, tmp_path: Path
) -> None:
    from medlens.io.limits import estimate_pil

    path = tmp_path / "big.jpg"
    photo = Image.open(samples.skin_jpeg).convert("RGB").resize((4000, 3000))
    photo.save(path, "JPEG", quality=90)
    budget = estimate_pil(2000, 1500, "RGB", alpha=False, fmt="jpeg")
    px = check_rgb(load_image(path, max_decode_bytes=budget))
    assert px.shape == (1500, 2000, 3)  # libjpeg's 1/2 scale
    full = load_image(path).pixels
    small = np.asarray(Image.fromarray(full).resize((2000, 1500), Image.Resampling.BOX))
    assert np.abs(px.astype(int) - small.astype(int)).mean() < 3  # the same picture


def test_multipage_tiff_says_it_used_the_first_page(tmp_path: Path) -> None:
    pages = [Image.new("L", (64, 48), v) for v in (10, 200, 90)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    decoded = load_image(path)
    assert decoded.context.frames == 3
    assert int(grey(check_rgb(decoded)).max()) == 10  # page 1 of 3


_PEAK_SCRIPT = """
import sys
from medlens.io.images import load_image
from medlens.models.lite import LiteEncoder
encoder = LiteEncoder()
data = open(sys.argv[1], "rb").read()
def status(key):
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
decoded = load_image(data)
crop = encoder.resize_crop([decoded.pixels])
peak = status("VmHWM")
print(peak - before, decoded.pixels.shape[0], decoded.pixels.shape[1], tuple(crop.shape))
"""


def _worst_png(out: Path, ratio: int, budget: int) -> Path:
    """The largest 8-bit RGB PNG of this aspect ratio the budget accepts."""
    from medlens.io.limits import estimate_pil

    h = 16
    while estimate_pil(ratio * (h + 16), h + 16, "RGB", alpha=False, fmt="png") <= budget:
        h += 16
    y, x = np.mgrid[0:h, 0 : ratio * h]
    rgb = np.stack([(x // 7) % 256, (y * 3) % 256, ((x + y) // 5) % 256], axis=2)
    Image.fromarray(rgb.astype(np.uint8)).save(out, "PNG", compress_level=1)
    return out


def _worst_dicom(out: Path, budget: int) -> Path:
    """The largest square 16-bit greyscale DICOM (rescale + window) the budget accepts."""
    from medlens.io.limits import estimate_dicom

    n = 256
    while estimate_dicom(n + 64, n + 64, samples=1, bits_allocated=16) <= budget:
        n += 64
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    ds.Rows = ds.Columns = n
    ramp = (np.add.outer(np.arange(n), np.arange(n)) % 4096).astype(np.int16)
    ds.PixelData = ramp.tobytes()
    ds.save_as(out)
    return out


@pytest.mark.parametrize("kind", ["png_20to1", "png_square", "dicom_square"])
def test_peak_memory_of_the_worst_accepted_input_stays_under_the_budget(
    tmp_path: Path, kind: str
) -> None:
    """Decode plus the encoder's resize, in a fresh process: peak RSS growth (Linux VmHWM,
    reset just before the decode) stays under the budget."""
    import subprocess
    import sys

    from medlens.config import get_settings

    budget = get_settings().max_decode_bytes
    if kind == "dicom_square":
        path = _worst_dicom(tmp_path / "worst.dcm", budget)
    else:
        path = _worst_png(tmp_path / "worst.png", 20 if kind == "png_20to1" else 1, budget)
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    growth, height, width, crop = run.stdout.split(maxsplit=3)
    assert crop.strip() == "(1, 3, 224, 224)"
    pixels = int(height) * int(width)
    assert pixels > 0.7 * budget / 60  # really near the budget's edge, not a small image
    print(f"{kind}: {width}x{height}, peak RSS growth {int(growth) / 2**20:.0f} MiB "
          f"of a {budget / 2**20:.0f} MiB budget")  # fmt: skip
    assert 0 < int(growth) < budget

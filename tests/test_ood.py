"""The gate before scoring (issue 13 item 1): quality checks, the out-of-distribution
reference (fit, storage, integrity) and abstention through ``MedLens.analyze``.

The acceptance and abstention *rates* are measured by ``benchmarks/ood_gate.py``
(docs/ood.md); here each behaviour is checked on real images and on references fitted
in the test."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens import MedLens
from medlens.analysis import ood
from medlens.errors import ModelUnavailable, OutOfDomain
from medlens.evaluation.ood_sets import KINDS, build
from medlens.models.card import (
    PACKAGED_CARDS,
    DomainReference,
    OodReference,
    SourceReference,
    find_ood,
    ood_path,
    read_ood,
    write_ood,
)
from medlens.training.ood import fit_source


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def lens() -> MedLens:
    return MedLens(retrieval=False)


# -- quality -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pixels", "why"),
    [
        (np.full((1, 1, 3), 200, np.uint8), "too small"),
        (np.full((12, 300, 3), 90, np.uint8), "too small"),
        (np.full((256, 256, 3), 128, np.uint8), "blank"),
        (np.full((256, 256, 3), (224, 172, 150), np.uint8), "blank"),
    ],
)
def test_images_that_show_nothing_abstain(pixels: np.ndarray, why: str) -> None:
    with pytest.raises(OutOfDomain, match=why):
        ood.check_pixels(pixels)


def test_poor_images_carry_low_quality_warnings() -> None:
    rng = np.random.default_rng(0)
    tiny = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    assert any("28x28" in w for w in ood.check_pixels(tiny))
    bright = np.full((128, 128, 3), 255, np.uint8)
    bright[:40] = rng.integers(0, 200, (40, 128, 3))
    assert any("over-exposed" in w for w in ood.check_pixels(bright))
    assert ood.check_pixels(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) == []
    gate = ood.Gate(warnings=ood.check_pixels(tiny))
    assert gate.status == "low_quality"


# -- the reference ---------------------------------------------------------------------------------
def _cloud(seed: int, n: int, centre: float, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(centre, 1.0, (n, dim))


def test_fit_source_admits_its_share_of_validation_and_rejects_far_points() -> None:
    u, v = np.eye(16)[0] * 6, np.eye(16)[1] * 6  # feature clouds away from the origin

    def feats(seed: int, n: int, at: np.ndarray) -> np.ndarray:
        return (_cloud(seed, n, 0.0, 16) + at).astype(np.float32)

    src = fit_source(
        "a",
        _cloud(0, 600, 0.0),
        _cloud(1, 400, 0.0),
        feats(2, 600, u),
        feats(3, 400, u),
        acceptance=0.95,
        bank_size=300,
        k=3,
    )
    held_out = src.scores(_cloud(4, 500, 0.0), feats(5, 500, u), 3)
    # Each distance admits 95 %; an image must pass both: about 0.95² ≈ 90 % here.
    assert 0.85 <= float((held_out <= 1).mean()) <= 0.97
    assert (src.scores(_cloud(6, 50, 8.0), feats(7, 50, u), 3) > 1).all()  # embedding far
    assert (src.scores(_cloud(8, 50, 0.0), feats(9, 50, v), 3) > 1).all()  # features far


def _reference(fp: str) -> OodReference:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(20, 6)).astype(np.float16)
    srcs = (
        SourceReference("x", rng.normal(size=4), np.eye(4), 9.5, bank, 0.3),
        SourceReference("y", rng.normal(size=4), np.eye(4), 7.0),
    )
    return OodReference(fp, {"dermatology": DomainReference(srcs, 0.99)}, 3, {"method": "test"})


def test_reference_round_trips_and_is_keyed_by_fingerprint(tmp_path: Path) -> None:
    ref = _reference("abc")
    back = read_ood(write_ood(ref, tmp_path))
    assert back.id == ref.id and back.domains["dermatology"].datasets == ("x", "y")
    assert back.k == 3 and back.uses_features
    emb, feats = np.zeros((1, 4)), np.ones((1, 6))
    assert np.allclose(
        back.domains["dermatology"].scores(emb, feats, 3)[0],
        ref.domains["dermatology"].scores(emb, feats, 3)[0],
        rtol=1e-3,
    )
    assert find_ood("abc", tmp_path).id == ref.id
    assert find_ood("other", tmp_path) is None


@pytest.mark.parametrize("attack", ["flip", "truncate", "nan"])
def test_a_corrupt_reference_is_an_error_never_a_silent_pass(tmp_path: Path, attack: str) -> None:
    path = write_ood(_reference("abc"), tmp_path)
    raw = bytearray(path.read_bytes())
    if attack == "flip":
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
    elif attack == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 3]))
    else:
        bad = _reference("abc")
        bad.domains["dermatology"].sources[0].mean[0] = np.nan
        path = write_ood(bad, tmp_path)
    with pytest.raises(ModelUnavailable, match="medlens ood fit"):
        find_ood("abc", tmp_path)


def test_without_a_reference_the_analysis_says_it_is_unchecked() -> None:
    gate = ood.Gate()
    assert ood.choose_domain(None, np.zeros(4), ["chest_xray"], gate) == "chest_xray"
    assert gate.warnings == [ood.NO_REFERENCE] and gate.ood is None


# -- through MedLens.analyze with the packaged reference ------------------------------------------
def test_the_default_model_ships_a_reference(lens: MedLens) -> None:
    ref = lens.card.ood
    assert ref is not None and ood_path(PACKAGED_CARDS, ref.fingerprint).is_file()
    assert set(ref.domains) == {"dermatology", "chest_xray"}


def test_in_domain_images_are_admitted_with_their_check(lens: MedLens, data_dir: Path) -> None:
    skin = next((data_dir / "isic2018-task3-test").rglob("*.jpg"))
    a = lens.analyze(skin)
    assert a.domain == "dermatology" and a.quality.status == "ok"
    assert a.quality.ood.domain == "dermatology" and a.quality.ood.score <= 1.0
    cxr = sorted((data_dir / "cxr-samples").rglob("*.png"))[0]
    b = lens.analyze(cxr)
    assert b.domain == "chest_xray" and b.quality.ood.domain == "chest_xray"


CAT_ADMITTED = (
    "the cat photo scores just inside the v5 dermatology reference (it abstained at 1.03 "
    "with v4): a known miss of the gate, counted in docs/ood.md"
)


@pytest.mark.parametrize(
    "label",
    [
        pytest.param("chelsea.png", marks=pytest.mark.xfail(strict=True, reason=CAT_ADMITTED)),
        "brick.png",
        "uniform noise 0",
        "checkerboard 16px",
    ],
)
def test_out_of_domain_images_abstain(lens: MedLens, label: str) -> None:
    """A few of each kind; the rates over every kind are in docs/ood.md (some natural
    photos and fundus images are still admitted: see there)."""
    images = dict(
        item for kind in ("natural_photos", "other_medical", "textures", "synthetic")
        for item in build(kind)
    )  # fmt: skip
    with pytest.raises(OutOfDomain, match="abstains"):
        lens.analyze(_png(images[label]))


def test_ct_pixels_without_their_header_abstain(lens: MedLens) -> None:
    ct = next(px for label, px in build("dicom_pixels") if label.startswith("CT"))
    with pytest.raises(OutOfDomain, match="abstains"):
        lens.analyze(_png(ct))


def test_the_other_domain_forced_abstains(lens: MedLens, data_dir: Path) -> None:
    cxr = sorted((data_dir / "cxr-samples").rglob("*.png"))[0]
    with pytest.raises(OutOfDomain, match="dermatology"):
        lens.analyze(cxr, domain="dermatology")
    skin = next((data_dir / "isic2018-task3-test").rglob("*.jpg"))
    with pytest.raises(OutOfDomain, match="chest"):
        lens.analyze(skin, domain="chest_xray")


def test_every_ood_kind_builds() -> None:
    for kind in KINDS:
        items = build(kind)
        assert len(items) >= 20, kind
        assert all(px.dtype == np.uint8 and px.shape[-1] == 3 for _, px in items)


def test_a_multi_page_tiff_says_which_page_was_analysed(lens: MedLens, data_dir: Path) -> None:
    skin = Image.open(next((data_dir / "isic2018-task3-test").rglob("*.jpg"))).convert("RGB")
    buf = io.BytesIO()
    skin.save(buf, format="TIFF", save_all=True, append_images=[skin.rotate(90), skin])
    a = lens.analyze(buf.getvalue())
    assert a.input.context.frames == 3
    assert any("3 frames or pages; only the first page" in w for w in a.quality.warnings)
    assert a.quality.status == "ok"  # a note, not a quality problem


def test_masked_and_collimated_images_are_not_under_exposed(data_dir: Path) -> None:
    from medlens.datasets import load_dataset

    pad = load_dataset("pad_ufes_20")  # lesions masked on black
    assert all(ood.check_pixels(pad.image(r)) == [] for r in pad.records[:60])
    dark = (np.random.default_rng(1).integers(0, 30, (128, 128, 3))).astype(np.uint8)
    assert any("under-exposed" in w for w in ood.check_pixels(dark))


@pytest.mark.slow
def test_bad_input_table_has_no_traceback_and_corrupt_state_never_triages(
    data_dir: Path,
) -> None:
    """The generator of docs/bad_inputs.md, run for real: every out-of-domain input and
    every kind of damaged state ends in an abstention, a clear error or (for caches) the
    same analysis as a clean install; never a traceback."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bad_input_table.py"
    spec = importlib.util.spec_from_file_location("bad_input_table", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    rows, counts = mod.analysis_table(data_dir)
    assert counts["tracebacks"] == 0 and counts["corrupt_triaged_wrong"] == 0, rows
    # "photo of a cat" is left out: the v5 gate admits it (CAT_ADMITTED, docs/bad_inputs.md).
    for label in ("CT head DICOM", "MR DICOM", "ultrasound DICOM", "RT dose DICOM",
                  "blank grey image", "1x1 image", "uniform noise"):  # fmt: skip
        line = next(x for x in rows.splitlines() if x.startswith(f"| {label}"))
        assert "`OutOfDomain`" in line, line
    for label in ("lite heads with 2 % of sign bits flipped", "model card that is not JSON",
                  "out-of-distribution reference with one flipped bit"):  # fmt: skip
        line = next(x for x in rows.splitlines() if x.startswith(f"| {label}"))
        assert "`ModelUnavailable`" in line, line


def test_a_dicom_header_outweighs_an_atypical_embedding() -> None:
    """A radiograph whose header says CR chest is scored even when it is unlike the
    training images, with a low-quality warning; without the header it abstains."""
    ref = _reference("abc")
    far = np.full((1, 4), 50.0)
    gate = ood.Gate()
    assert ood.choose_domain(ref, far, ["dermatology"], gate, header=True) == "dermatology"
    assert gate.status == "low_quality" and "DICOM header says" in gate.warnings[0]
    assert gate.ood is not None and gate.ood["score"] > 1
    with pytest.raises(OutOfDomain):
        ood.choose_domain(ref, far, ["dermatology"], ood.Gate())


def test_a_real_chest_dicom_is_scored(lens: MedLens, data_dir: Path) -> None:
    a = lens.analyze(data_dir / "cxr-samples" / "Fake_MONOHR1.dcm")
    assert a.domain == "chest_xray" and a.domain_source == "dicom" and a.quality.ood is not None
    admitted = a.quality.ood.score <= 1
    assert admitted or any("DICOM header says" in w for w in a.quality.warnings)

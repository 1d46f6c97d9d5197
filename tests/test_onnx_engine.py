"""The ONNX Runtime engine of single-image analysis (``models.onnx_lite``): exported from
the shipped lite model, it must give the torch model's embeddings and the same analysis,
let a fresh process analyse without importing torch, and step aside for torch whenever
its export is stale, damaged or switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medlens import MedLens
from medlens.config import Settings
from medlens.io import load_image
from medlens.models import onnx_lite
from medlens.models.base import flipped
from medlens.models.registry import load_analysis_encoder

SKIN = "isic2018-task3-test/images/ISIC_0034524.jpg"
CXR_1024 = "cxr-samples/00000001_000.png"  # resized 1024 → 224: PIL's resize vs torch's


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_home")


@pytest.fixture(scope="module")
def engine(home: Path) -> onnx_lite.OnnxLite:
    enc = load_analysis_encoder("lite", device="cpu", cache_dir=home / "cache", onnx=True)
    assert isinstance(enc, onnx_lite.OnnxLite), "the lite model must export to ONNX"
    return enc


def test_engine_reproduces_the_torch_model_on_real_images(
    engine: onnx_lite.OnnxLite, data_dir: Path
) -> None:
    from medlens.models import load_encoder

    torch_enc = load_encoder("lite")
    skin = load_image(data_dir / SKIN).pixels
    cxr = load_image(data_dir / CXR_1024).pixels
    assert cxr.shape[0] > 224  # the resize path is exercised
    views = [skin, flipped(skin, "horizontal"), cxr]
    emb, feats = engine.embed_images_and_features(views, batch_size=len(views))
    want = torch_enc.embed_images(views, batch_size=len(views))
    assert emb.shape == want.shape and feats.shape == (3, torch_enc.image_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.all((emb * want).sum(axis=1) > 0.99999)
    assert np.abs(emb[:2] - want[:2]).max() < 1e-4  # no resize: the same arithmetic
    assert np.abs(emb - want).max() < 2e-3  # PIL vs torchvision resize: ±1 grey level
    np.testing.assert_allclose(
        feats[:1], torch_enc.image_features([skin]).numpy(), rtol=1e-4, atol=1e-4
    )
    assert engine.fingerprint == torch_enc.fingerprint
    assert engine.preprocess_version == torch_enc.preprocess_version


def test_analysis_is_the_same_with_either_engine(
    engine: onnx_lite.OnnxLite, home: Path, data_dir: Path
) -> None:
    fast = MedLens(settings=Settings(home=home, onnx_engine=True))
    slow = MedLens(settings=Settings(home=home, onnx_engine=False))
    assert type(fast.encoder).__name__ == "OnnxLite"
    assert type(slow.encoder).__name__ == "LiteEncoder"
    for name in (SKIN, CXR_1024, "cxr-samples/Fake_MONOHR1.dcm"):
        a, b = fast.analyze(data_dir / name), slow.analyze(data_dir / name)
        assert (a.domain, a.triage.level) == (b.domain, b.triage.level), name
        assert [f.id for f in a.findings] == [f.id for f in b.findings], name
        pa = np.array([f.probability for f in a.findings])
        pb = np.array([f.probability for f in b.findings])
        assert np.abs(pa - pb).max() <= 2e-3, name


def test_a_fresh_process_analyses_without_importing_torch(
    engine: onnx_lite.OnnxLite, home: Path, data_dir: Path
) -> None:
    code = (
        "import sys\nfrom medlens import MedLens\n"
        "r = MedLens().analyze(sys.argv[1])\n"
        "print(r.findings[0].id, 'torch' in sys.modules, type(MedLens().encoder).__name__)"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code, str(data_dir / SKIN)],
            env={**os.environ, "MEDLENS_HOME": str(home)},
            capture_output=True,
            text=True,
            check=True,
        )
        for _ in range(2)  # the first may fill caches that need the text tower (torch)
    ]
    top, torch_imported, engine_name = runs[1].stdout.split()
    assert top and torch_imported == "False" and engine_name == "OnnxLite"


def test_stale_damaged_or_switched_off_exports_fall_back_to_torch(
    engine: onnx_lite.OnnxLite, home: Path, tmp_path: Path
) -> None:
    cache = home / "cache"
    _, stamp_file = onnx_lite._paths(cache, "lite")
    assert onnx_lite.open_engine("lite", "cpu", cache) is not None
    # switched off, or not the CPU: torch
    off = load_analysis_encoder("lite", device="cpu", cache_dir=cache, onnx=False)
    assert type(off).__name__ == "LiteEncoder"
    # a source file that changed since the export (size/mtime in the stamp): stale
    stamp = json.loads(stamp_file.read_text())
    stamp["sources"][0][2] += 1
    stamp_file.write_text(json.dumps(stamp))
    assert onnx_lite.open_engine("lite", "cpu", cache) is None
    # ... and the next analysis encoder re-exports it
    again = load_analysis_encoder("lite", device="cpu", cache_dir=cache, onnx=True)
    assert isinstance(again, onnx_lite.OnnxLite)
    assert onnx_lite.open_engine("lite", "cpu", cache) is not None
    # code from another version: stale
    stamp = json.loads(stamp_file.read_text())
    stamp["engine"] = "0/other"
    stamp_file.write_text(json.dumps(stamp))
    assert onnx_lite.open_engine("lite", "cpu", cache) is None
    # a damaged graph (truncated on disk): torch, with a warning, never a crash
    other = tmp_path / "cache"
    assert onnx_lite.export(again.torch_encoder, "lite", other) is not None
    g, _ = onnx_lite._paths(other, "lite")
    g.write_bytes(g.read_bytes()[:1000])
    assert onnx_lite.open_engine("lite", "cpu", other) is None
    assert onnx_lite.open_engine("lite", "cuda", other) is None
    # a broken stamp
    _, s = onnx_lite._paths(other, "lite")
    s.write_text("{not json")
    assert onnx_lite.open_engine("lite", "cpu", other) is None

"""The lite backbones (``medlens.models.lite.BACKBONES``) and the backbone comparison
benchmark: every backbone builds from its offline weights and pools square and
non-square inputs; ``benchmarks/backbones.py`` runs end to end on a few real images
(its numbers are for docs/backbones.md, never asserted on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medlens.models.lite import BACKBONES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_pools_square_and_native_aspect(name: str) -> None:
    spec = BACKBONES[name]
    net = spec.build().eval()
    # lite's tune_from slices net[0] (the blocks) and runs the rest as the tail
    assert isinstance(net, torch.nn.Sequential) and len(net[0]) > 10
    files = spec.weight_files()
    assert files and all(Path(f).is_file() for f in files)
    with torch.inference_mode():
        for h, w in ((224, 224), (224, 298)):
            x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
            out = net(x)
            assert out.shape == (2, spec.feature_dim)
            assert torch.isfinite(out).all()
    # pretrained, not random: a random init would not agree with itself across builds
    assert torch.equal(
        next(iter(net.state_dict().values())), next(iter(spec.build().state_dict().values()))
    )


@pytest.mark.slow
def test_backbones_benchmark_writes_table(tmp_path: Path, data_dir: Path) -> None:
    out, raw = tmp_path / "backbones.md", tmp_path / "backbones.json"
    args = ["--limit", "16", "--latency-runs", "2", "--bootstrap", "20"]
    args += ["--cache", str(tmp_path / "cache"), "--out", str(out), "--json", str(raw)]
    env = {**os.environ, "MEDLENS_HOME": str(tmp_path / "home"), "MEDLENS_DATA": str(data_dir)}
    cmd = [sys.executable, "benchmarks/backbones.py", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(raw.read_text())
    assert {(r["backbone"], r["mode"]) for r in rows} == {
        (b, m) for b in BACKBONES for m in ("224", "native")
    }
    for r in rows:
        assert 0.0 <= r["bacc"] <= 1.0 and r["latency_224"] > 0 and r["weights_mb"] > 1
    text = out.read_text()
    assert "benchmarks/backbones.py --limit 16" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "|---" not in line]
    assert sum(line.split("|")[1].strip() in BACKBONES for line in table) >= 2 * len(BACKBONES)
    # features are cached per backbone, geometry and set (HAM train, HAM val, Derm7pt val)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(BACKBONES) * 2 * 3

"""The lite training recipe end to end on real sample images (tiny budgets), and the
``medlens train align`` command's LoRA path on a tiny random transformers CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from medlens.cli import app
from medlens.errors import ConfigError
from medlens.models.lite import LiteEncoder, _image_tower
from medlens.training.align import AlignConfig, _autocast, resolve_precision, train_align
from medlens.training.lora import colour_stretch, low_resolution

TUNE_FROM = 14


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tuned")
    prefix_before = {
        k: v.clone() for k, v in _image_tower("mobilenet_v2", "cpu").state_dict().items()
    }
    cfg = AlignConfig(
        data=("dermamnist", "pneumoniamnist", "pad_ufes_20"),
        epochs=3,
        lr=3e-3,
        batch_size=32,
        patience=3,
        limit=48,
        tune_from=TUNE_FROM,
        image_size=64,
        colour_constancy=True,
        augment=True,
        views=2,
        cap=30,
        floor=6,
    )
    metrics = train_align(cfg, out, out / "cache")
    after = _image_tower("mobilenet_v2", "cpu").state_dict()
    assert all(torch.equal(prefix_before[k], after[k]) for k in after), "shared tower changed"
    return out, metrics


def test_tuned_recipe_trains_tail_and_heads_only(tuned_run: tuple[Path, dict]) -> None:
    out, metrics = tuned_run
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 3 and metrics["best_epoch"] >= 1
    assert metrics["minutes_preparing"] >= 0 and metrics["minutes_training"] > 0
    assert metrics["precision"] == resolve_precision("auto")  # recorded as actually run
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last["dermatology"] < first["dermatology"] and last["domain"] < first["domain"], history
    assert {"dermamnist", "pad_ufes_20"} <= set(history[-1]["val"])  # first 48: one CXR class
    # The saved file holds heads + the tail from block 14 on; nothing of the prefix.
    state = load_file(str(out / "lite_heads.safetensors"))
    assert any(k.startswith("image_tail.") for k in state)
    pretrained = LiteEncoder.untrained(seed=0, image_size=64, tune_from=TUNE_FROM)
    ref = pretrained.state_dict()
    assert set(state) == set(ref)
    tail_changed = [
        k for k in state if k.startswith("image_tail.") and not torch.equal(state[k], ref[k])
    ]
    assert tail_changed, "the tail should have trained"
    assert any(".conv." in k or ".0." in k for k in tail_changed)


def test_tuned_weights_load_and_embed(tuned_run: tuple[Path, dict], data_dir: Path) -> None:
    out, _ = tuned_run
    enc = LiteEncoder.load(out / "lite_heads.safetensors")
    assert (enc.tune_from, enc.image_size, enc.colour_constancy) == (TUNE_FROM, 64, True)
    assert "shades-of-gray" in enc.preprocess_version
    assert enc.features_key != enc.backbone_fingerprint  # features depend on the tail
    assert enc.meta["recipe"]["tune_from"] == TUNE_FROM
    from medlens.datasets import load_dataset

    m = load_dataset("isic2018")
    images = [m.image(r) for r in m.records[:3]]
    emb = enc.embed_images(images)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb, enc.embed_images(images))  # eval mode: deterministic


def test_colour_constancy_removes_a_cast_and_keeps_grey() -> None:
    from medlens.models.lite import shades_of_gray

    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.uniform(40, 200, (1, 3, 32, 32)).astype(np.float32))
    grey = base[:, :1].repeat(1, 3, 1, 1)
    torch.testing.assert_close(shades_of_gray(grey), grey)
    cast = base * torch.tensor([1.3, 0.9, 0.8]).view(1, 3, 1, 1)
    a, b = shades_of_gray(base), shades_of_gray(cast)
    ratio = lambda x: x.pow(6).mean((0, 2, 3)).pow(1 / 6)  # noqa: E731
    torch.testing.assert_close(ratio(a) / ratio(a).mean(), torch.ones(3), atol=0.02, rtol=0)
    torch.testing.assert_close(ratio(b) / ratio(b).mean(), torch.ones(3), atol=0.02, rtol=0)


def test_cli_lora_path_on_a_tiny_hf_clip(tmp_path: Path, data_dir: Path) -> None:
    """`medlens train align --model hf:<folder>`: LoRA on real DermaMNIST/PAD pairs, the
    adapter and recipe written, only LoRA and projection tensors saved."""
    from test_lora import _tiny_hf_clip

    enc = _tiny_hf_clip(tmp_path)
    folder = tmp_path / "tiny-clip"
    out = tmp_path / "run"
    args = [
        "train", "align", "--model", f"hf:{folder}", "--data", "dermamnist,pad_ufes_20",
        "--limit", "12", "--epochs", "3", "--batch-size", "8", "--lr", "2e-3",
        "--lora-r", "2", "--lora-alpha", "4", "--no-balance", "--augment", "--out", str(out),
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    state = load_file(str(out / "adapter.safetensors"))
    assert any("lora_A" in k for k in state) and "visual_projection.weight" in state
    assert all("lora_" in k or "projection" in k or k == "logit_scale" for k in state)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == f"hf:{folder}"
    losses = recipe["lora"]["loss"]["epoch"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert recipe["pairs"]["data"] == ["dermamnist", "pad_ufes_20"]
    assert enc.fingerprint  # the fixture model itself was not touched by the CLI run


def test_precision_choice_and_bf16_prefix_stays_close_to_fp32(data_dir: Path) -> None:
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") in ("bf16", "fp32")
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp8")
    # The tuned recipe caches bf16 prefix maps but serves fp32: the two must agree.
    from medlens.datasets import load_dataset

    m = load_dataset("pad_ufes_20")
    images = [m.image(r) for r in m.records if r.path is not None][:8]
    enc = LiteEncoder.untrained(seed=0, image_size=224, tune_from=7, colour_constancy=True)
    enc.eval()
    x = enc.preprocess(images)
    ref = enc.prefix_forward(x).float()
    with _autocast("bf16", "cpu"):
        low = enc.prefix_forward(x).float()
    rel = (low - ref).norm() / ref.norm()
    assert 0 < rel < 0.25, rel  # the maps differ (~12 % on this CPU) ...
    with torch.no_grad():
        cos = F.cosine_similarity(enc.image_tail(ref), enc.image_tail(low))
    assert cos.min() > 0.98, cos  # ... the pooled features the heads see barely do


def test_colour_stretch_and_low_resolution_augmentations(data_dir: Path) -> None:
    from medlens.datasets import load_dataset

    m = load_dataset("pad_ufes_20")
    img = next(m.image(r) for r in m.records if r.path is not None)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # a writable copy
    torch.manual_seed(0)
    s = colour_stretch(x, gain=(2.0, 2.0))
    assert s.dtype == torch.uint8 and s.shape == x.shape
    assert (s.float().std((1, 2)) > 1.5 * x.float().std((1, 2))).all()
    assert (s == 255).float().mean() > (x == 255).float().mean()  # pushed into clipping
    lo = low_resolution(x, sides=(24, 24))
    assert lo.shape == x.shape and lo.dtype == torch.uint8
    detail = lambda t: t.float().diff(dim=-1).abs().mean()  # noqa: E731
    assert detail(lo) < 0.7 * detail(x)  # fine detail is gone
    tiny = x[:, :20, :20]
    assert torch.equal(low_resolution(tiny, sides=(24, 72)), tiny)  # already that small

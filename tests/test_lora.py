"""LoRA training on tiny, randomly initialised open_clip and transformers CLIP models (built
here, no hub access) with real sample images and their knowledge-pack finding prompts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medlens.training.lora import (
    BalanceRecipe,
    adapter_state,
    balance_indices,
    make_augment,
    pairs_from_datasets,
    train_lora,
)

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_LAYERS = {
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
}


@pytest.fixture(scope="module")
def pairs(data_dir: Path) -> list[tuple[np.ndarray, str, str]]:
    """33 real images: ISIC 2018 dermoscopy balanced to 4 per class (all 7 classes) and the
    labelled chest X-ray samples, each with a random phrasing of its finding."""
    balance = BalanceRecipe(cap=4, floor=4, seed=0)
    skin, recipe = pairs_from_datasets(("isic2018",), split="test", balance=balance, seed=0)
    cxr, _ = pairs_from_datasets(("cxr_samples",), split=None, seed=0)
    assert recipe["n_pairs"] == 28 and len(cxr) == 5
    counts = recipe["class_counts"]
    assert len(counts) == 7 and all(c["after"] == 4 for c in counts.values())
    assert counts["isic2018:melanocytic_nevus"]["before"] == 909
    assert {d for _, _, d in skin} == {"dermatology"} and {d for _, _, d in cxr} == {"chest_xray"}
    return skin + cxr


def _clip_tokenizer() -> Any:
    """The real CLIP BPE, rebuilt from the vocabulary open_clip ships in its package."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def _tiny_open_clip(tmp: Path) -> Any:
    import open_clip

    from medlens.models.open_clip_encoder import OpenClipEncoder

    (tmp / "medlens-test-lora-vit.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp)
    torch.manual_seed(0)
    return OpenClipEncoder("medlens-test-lora-vit")


def _tiny_hf_clip(tmp: Path) -> Any:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from medlens.models.hf_encoder import HFEncoder

    tok = _clip_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(
        CLIPConfig(
            text_config={**TINY_LAYERS, "vocab_size": len(tok), "max_position_embeddings": 77},
            vision_config={**TINY_LAYERS, "image_size": 64, "patch_size": 16},
            projection_dim=24,
        )
    )
    folder = tmp / "tiny-clip"
    model.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return HFEncoder(str(folder))


def _base_name(name: str) -> str:
    """A backbone tensor's name before peft wrapped its module (``.base_layer`` removed)."""
    return name.replace(".base_layer", "")


def _check_run(enc: Any, pairs: list, head_names: tuple[str, ...], **kw: Any) -> dict:
    before = {k: v.detach().clone() for k, v in enc.model.state_dict().items()}
    fp_before = enc.fingerprint
    out = train_lora(enc, pairs, r=4, alpha=8, seed=0, **kw)
    after = enc.model.state_dict()

    first, last = out["loss"]["epoch"][0], out["loss"]["epoch"][-1]
    print(enc.name, "epoch losses", out["loss"]["epoch"])
    assert last < first, out["loss"]["epoch"]
    assert any("lora_" in n for n in out["trainable"])
    assert all("lora_" in n or n in head_names for n in out["trainable"]), out["trainable"]
    assert set(head_names) <= set(out["trainable"])
    assert out["n_trainable"] < 0.5 * out["n_total"]

    changed = []
    for name, value in after.items():
        if "lora_" in name:
            continue
        ref = before[_base_name(name)]  # every pretrained tensor still exists, same shape
        if not torch.equal(ref, value):
            changed.append(name)
    assert changed, "projection heads should have trained"
    assert set(changed) <= set(head_names), changed  # backbone weights bit-identical
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # adapters moved off zero init
    assert set(adapter_state(enc)) >= set(head_names)

    # Still an encoder: unit-norm embeddings, a refreshed fingerprint and logit scale.
    emb = enc.embed_images([p[0] for p in pairs[:3]])
    txt = enc.embed_texts([p[1] for p in pairs[:3]])
    for x in (emb, txt):
        assert np.all(np.isfinite(x))
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert enc.fingerprint != fp_before
    assert enc.logit_scale == pytest.approx(float(enc.model.logit_scale.exp()), rel=1e-6)
    assert not any(p.requires_grad for p in enc.model.parameters())
    return out


def test_lora_open_clip_vit(pairs: list, tmp_path: Path) -> None:
    enc = _tiny_open_clip(tmp_path)
    out = _check_run(
        enc,
        pairs,
        ("visual.proj", "text_projection", "logit_scale"),
        epochs=4,
        lr=2e-3,
        batch_size=16,
        augment=make_augment(),
    )
    # nn.MultiheadAttention is adapted through peft (fused in_proj + out_proj), the MLPs too.
    names = out["trainable"]
    assert "visual.transformer.resblocks.0.attn.lora_A_in" in names
    assert "transformer.resblocks.1.attn.lora_B_out" in names
    assert any("mlp.c_fc.lora_A" in n for n in names) and any(
        "mlp.c_proj.lora_B" in n for n in names
    )
    assert any(n.startswith("visual.") for n in names) and any(
        n.startswith("transformer.") for n in names
    )


def test_lora_hf_clip(pairs: list, tmp_path: Path) -> None:
    enc = _tiny_hf_clip(tmp_path)
    heads = ("visual_projection.weight", "text_projection.weight", "logit_scale")
    out = _check_run(enc, pairs, heads, epochs=4, lr=2e-3, batch_size=16)
    for part in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
        assert any(f"{part}.lora_A" in n for n in out["trainable"]), part


def test_lora_is_deterministic(pairs: list, tmp_path: Path) -> None:
    """Same seed, same data → the same adapters and losses, augmentation included."""
    runs, states = [], []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        enc = _tiny_open_clip(tmp_path / str(i))
        kw = {"r": 2, "alpha": 4, "epochs": 2, "lr": 1e-3, "batch_size": 6, "seed": 3}
        runs.append(train_lora(enc, pairs[::3], augment=make_augment(), **kw))
        states.append(adapter_state(enc))
    assert runs[0]["loss"]["step"] == runs[1]["loss"]["step"]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_balancing_and_augmentation(pairs: list) -> None:
    classes = ["a"] * 50 + ["b"] * 3 + ["c"] * 10
    idx, counts = balance_indices(classes, BalanceRecipe(cap=20, floor=8, seed=0))
    got = {c: sum(classes[i] == c for i in idx) for c in "abc"}
    assert got == {"a": 20, "b": 8, "c": 10}
    assert counts["a"] == {"before": 50, "after": 20} and counts["b"]["after"] == 8
    assert len(set(idx[[classes[i] == "a" for i in idx]])) == 20  # undersampled w/o replacement

    aug = make_augment()
    skin = pairs[0][0]
    torch.manual_seed(0)
    a = aug(skin, "dermatology")
    torch.manual_seed(0)
    b = aug(skin, "dermatology")
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert a.shape[:2] == (min(skin.shape[:2]),) * 2
    np.testing.assert_array_equal(a, b)  # seeded → reproducible
    assert not np.array_equal(a, aug(skin, "dermatology"))


def test_a_saved_adapter_loads_back_by_model_spec(pairs: list, tmp_path: Path) -> None:
    """What `medlens train align --model hf:<folder> --out RUN` writes (adapter tensors +
    recipe.json) loads with `--model lora:RUN` and `--model hf:<folder>+lora:<file>`, and
    embeds exactly as the adapted model in memory (issue 13, item 8)."""
    from safetensors.torch import save_file

    from medlens.errors import ConfigError
    from medlens.models.registry import clear_encoder_cache, load_encoder

    enc = _tiny_hf_clip(tmp_path)
    base = f"hf:{tmp_path / 'tiny-clip'}"
    out = train_lora(enc, pairs[::3], r=4, alpha=8, epochs=1, lr=2e-3, batch_size=6, seed=1)
    run = tmp_path / "run"
    run.mkdir()
    save_file(adapter_state(enc), str(run / "adapter.safetensors"))  # as cli/train.py does
    (run / "recipe.json").write_text(json.dumps({"model": base, "lora": out}, default=str))

    images, texts = [p[0] for p in pairs[:4]], [p[1] for p in pairs[:4]]
    want_img, want_txt = enc.embed_images(images), enc.embed_texts(texts)
    clear_encoder_cache()
    plain = load_encoder(base).embed_images(images)
    assert not np.allclose(plain, want_img, atol=1e-4)  # the adapter changes embeddings
    for spec in (f"lora:{run}", f"{base}+lora:{run / 'adapter.safetensors'}"):
        got = load_encoder(spec)
        assert got.name == spec
        np.testing.assert_allclose(got.embed_images(images), want_img, atol=1e-6)
        np.testing.assert_allclose(got.embed_texts(texts), want_txt, atol=1e-6)
        assert got.fingerprint == enc.fingerprint
        assert got.logit_scale == pytest.approx(enc.logit_scale)
    # The cached base is not adapted by loading an adapter on top of it.
    np.testing.assert_array_equal(load_encoder(base).embed_images(images), plain)

    (run / "recipe.json").unlink()
    clear_encoder_cache()
    with pytest.raises(ConfigError, match="recipe"):
        load_encoder(f"lora:{run}")
    with pytest.raises(ConfigError, match="open_clip: or hf: base"):
        load_encoder(f"lite+lora:{run}")

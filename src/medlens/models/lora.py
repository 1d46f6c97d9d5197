"""LoRA adapters on open_clip / transformers CLIP encoders: the layers, which tensors an
adapter holds, and loading a saved one (``--model lora:<run>`` / ``<base>+lora:<run>``).

Training them is ``medlens.training.lora``; loading lives here, in the models layer, so
resolving a model spec never imports training code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medlens.errors import ConfigError

# Module-name patterns (full names, regex) adapted by default, per architecture. open_clip's
# own ViT uses nn.MultiheadAttention (adapted by ``LoraMultiheadAttention`` below: fused
# in_proj and out_proj) and mlp.c_fc/c_proj; timm trunks (BiomedCLIP) use attn.qkv/proj
# and mlp.fc1/fc2; transformers CLIP uses q/k/v/out_proj and fc1/fc2.
DEFAULT_TARGETS: dict[str, str] = {
    "open_clip": (
        r".*resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)"
        r"|.*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    ),
    "hf": r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
}
# Parameters that always train: the towers' projections into the joint space + the scale.
HEAD_PATTERNS: dict[str, str] = {
    "open_clip": r"^(visual\.proj|visual\.head\..*|text_projection.*|text\.proj.*|logit_scale)$",
    "hf": r"^(visual_projection\..*|text_projection\..*|logit_scale)$",
}


class LoraMultiheadAttention(nn.Module):
    """LoRA on an ``nn.MultiheadAttention``'s fused q/k/v projection and output projection.

    Why not peft's own MHA layer: it merges the adapter into the frozen weights before
    every forward and subtracts it afterwards, and that float round trip drifts the
    "frozen" pretrained weights a little at every step. Here the adapted weights are
    passed functionally (``torch.func.functional_call``); the base tensors are never written.
    """

    def __init__(self, base: nn.MultiheadAttention, r: int, alpha: float):
        super().__init__()
        if not base._qkv_same_embed_dim:
            raise ConfigError("LoRA on MultiheadAttention needs kdim = vdim = embed_dim")
        self.base_layer = base
        e = base.embed_dim
        self.scaling = float(alpha) / r
        self.lora_A_in = nn.Parameter(torch.empty(r, e))
        self.lora_B_in = nn.Parameter(torch.zeros(3 * e, r))
        self.lora_A_out = nn.Parameter(torch.empty(r, e))
        self.lora_B_out = nn.Parameter(torch.zeros(e, r))
        for a in (self.lora_A_in, self.lora_A_out):  # as peft initialises lora_A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.batch_first = base.batch_first
        self.embed_dim, self.num_heads = base.embed_dim, base.num_heads

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        b = self.base_layer
        weights = {
            "in_proj_weight": b.in_proj_weight + self.scaling * self.lora_B_in @ self.lora_A_in,
            "out_proj.weight": b.out_proj.weight + self.scaling * self.lora_B_out @ self.lora_A_out,
        }
        return torch.func.functional_call(b, weights, args, kwargs)


def _matches(name: str, targets: str | list[str]) -> bool:
    """peft's target semantics: a regex over the full name, or a list of name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def inject_lora(
    model: nn.Module, targets: str | list[str], r: int, alpha: int, dropout: float
) -> list[str]:
    """Add LoRA adapters to the modules ``targets`` names (in place): peft for Linear
    layers, ``LoraMultiheadAttention`` for nn.MultiheadAttention. Returns adapted names."""
    from peft import LoraConfig, inject_adapter_in_model

    mha = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and _matches(n, targets)
    ]
    inside_mha = tuple(f"{n}." for n in mha)
    other = [
        n
        for n, m in model.named_modules()
        if n and _matches(n, targets) and n not in mha and not n.startswith(inside_mha)
    ]
    if other:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=other)
        inject_adapter_in_model(config, model)
    for name in mha:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoraMultiheadAttention(getattr(owner, child), r, alpha))
    return sorted([*mha, *other])


# -- the two families behind one small interface ------------------------------------------
class _Family:
    """How to tokenize, preprocess and run one encoder family's model for training."""

    def __init__(self, encoder: Any):
        from medlens.models.hf_encoder import HFEncoder
        from medlens.models.open_clip_encoder import OpenClipEncoder

        if isinstance(encoder, OpenClipEncoder):
            self.kind = "open_clip"
        elif isinstance(encoder, HFEncoder):
            if encoder.model_type != "clip":
                raise ConfigError(
                    f"LoRA training supports CLIP-style hf models; {encoder.name} is "
                    f"{encoder.model_type!r}"
                )
            self.kind = "hf"
        else:
            raise ConfigError(
                f"LoRA training needs an open_clip or hf encoder, not {type(encoder).__name__} "
                "(the lite encoder trains its heads with `medlens train align`)"
            )
        self.enc = encoder

    @property
    def model(self) -> torch.nn.Module:
        return self.enc.model

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        pil = [Image.fromarray(a) for a in images]
        if self.kind == "open_clip":
            return torch.stack([self.enc.preprocess(im) for im in pil])
        return self.enc.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def tokens(self, texts: Sequence[str]) -> Any:
        if self.kind == "open_clip":
            return self.enc.tokenizer(list(texts))
        tok = self.enc.tokenizer(
            list(texts),
            padding=self.enc.family.padding,
            truncation=True,
            max_length=self.enc.max_length,
            return_tensors="pt",
        )
        return {k: tok[k] for k in self.enc.family.text_inputs if k in tok}

    def encode(self, pixels: torch.Tensor, tokens: Any) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.enc.device
        if self.kind == "open_clip":
            img = self.model.encode_image(pixels.to(dev), normalize=True)
            txt = self.model.encode_text(tokens.to(dev), normalize=True)
            return img, txt
        from medlens.models.hf_encoder import _pooled

        img = _pooled(self.model.get_image_features(pixel_values=pixels.to(dev)))
        txt = _pooled(self.model.get_text_features(**{k: v.to(dev) for k, v in tokens.items()}))
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().reshape(-1)[0].clamp(max=100.0)


def _refresh(encoder: Any) -> None:
    """The encoder caches its fingerprint and logit scale: recompute both."""
    encoder.__dict__.pop("fingerprint", None)
    if hasattr(encoder, "family"):
        encoder.logit_scale = encoder.family.logit_scale(encoder.model)
    else:
        encoder.logit_scale = float(
            encoder.model.logit_scale.detach().exp().reshape(-1)[0].clamp(max=100.0)
        )


def adapter_state(encoder: Any) -> dict[str, torch.Tensor]:
    """The tensors LoRA training changed (adapters + projections + scale), for saving."""
    fam = _Family(encoder)
    heads = re.compile(HEAD_PATTERNS[fam.kind])
    return {
        k: v.detach().cpu().contiguous()
        for k, v in fam.model.state_dict().items()
        if "lora_" in k or heads.match(k)
    }


# -- loading a saved adapter (``--model lora:<run folder>``) -------------------------------
ADAPTER_FILE = "adapter.safetensors"
RECIPE_FILE = "recipe.json"


def load_adapter(
    path: str, base: str | None, load_base: Callable[[str], Any], *, name: str | None = None
) -> Any:
    """The encoder ``medlens train align --model <base>`` adapted: a fresh ``base`` encoder
    (from ``load_base``; never a shared cached instance, the adapters go in place) with
    the run's LoRA layers re-injected from its recipe and the saved tensors loaded.

    ``path``: the run folder or its ``adapter.safetensors``; ``recipe.json`` beside it
    gives r, alpha and the target modules, and the base model spec unless ``base`` names
    one (the base moved, e.g. to an air-gapped folder). Every saved tensor must fit the
    rebuilt model and every adapter tensor must be saved: a partial load would embed with
    random adapters.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from medlens.errors import ModelUnavailable

    p = Path(path).expanduser()
    file = p / ADAPTER_FILE if p.is_dir() else p
    if not file.is_file():
        raise ModelUnavailable(
            f"LoRA adapter {file} does not exist; `medlens train align --model hf:… --out DIR` "
            f"writes DIR/{ADAPTER_FILE}"
        )
    recipe_path = file.parent / RECIPE_FILE
    try:
        run = json.loads(recipe_path.read_text("utf-8"))
        recipe = run["lora"]["recipe"]
        r, alpha, targets = int(recipe["r"]), int(recipe["alpha"]), recipe["targets"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"LoRA adapter {file}: {recipe_path} is missing or not a training recipe ({exc}); "
            "it names the adapted modules, r and alpha"
        ) from exc
    base = base or run.get("model")
    if not isinstance(base, str) or not base or "lora:" in base:
        raise ConfigError(f"LoRA adapter {file}: no usable base model spec (got {base!r})")
    enc = load_base(base)
    fam = _Family(enc)
    inject_lora(fam.model, targets, r, alpha, 0.0)
    state = load_file(str(file), device=str(enc.device))
    own = fam.model.state_dict()
    heads = re.compile(HEAD_PATTERNS[fam.kind])
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in own if ("lora_" in k or heads.match(k)) and k not in state)
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        raise ConfigError(
            f"LoRA adapter {file} does not fit {base}: {len(unexpected)} unknown, "
            f"{len(missing)} missing, {len(wrong)} mis-shaped tensors "
            f"(e.g. {(unexpected + missing + wrong)[:3]})"
        )
    fam.model.load_state_dict(state, strict=False)
    fam.model.eval()
    fam.model.requires_grad_(False)
    _refresh(enc)
    enc.name = name or f"{base}+lora:{file}"
    return enc

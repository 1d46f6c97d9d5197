"""transformers dual encoders (CLIP, ALIGN, SigLIP) behind the Encoder protocol.

The family is read from ``config.model_type`` so one ``hf:<id or folder>`` spec covers
hub ids and air-gapped copies alike. Each family's quirks (padding the model was trained
with, how its temperature is stored, softmax vs sigmoid scoring) are data in
``HF_FAMILIES``, not branches scattered through the code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medlens.errors import ConfigError, ModelUnavailable
from medlens.models import _util
from medlens.models._state import state_fingerprint


def _exp_scale(model: Any) -> float:
    return float(model.logit_scale.detach().exp().reshape(-1)[0])


@dataclass(frozen=True)
class HFFamily:
    """How to drive one transformers dual-encoder family."""

    model_class: str
    score_kind: str  # "softmax" (CLIP-style contrastive) or "sigmoid" (SigLIP)
    padding: str  # tokenizer padding the model was trained with
    max_length: int | None  # None: text_config.max_position_embeddings
    text_inputs: tuple[str, ...]  # tokenizer outputs the text tower takes
    logit_scale: Callable[[Any], float]
    logit_bias: Callable[[Any], float | None]
    dim: Callable[[Any], int]


HF_FAMILIES: dict[str, HFFamily] = {
    "clip": HFFamily(
        model_class="CLIPModel",
        score_kind="softmax",
        padding="longest",
        max_length=None,
        text_inputs=("input_ids", "attention_mask"),
        logit_scale=_exp_scale,
        logit_bias=lambda m: None,
        dim=lambda c: int(c.projection_dim),
    ),
    "align": HFFamily(
        model_class="AlignModel",
        score_kind="softmax",
        padding="max_length",
        max_length=64,  # AlignProcessor's default: the length ALIGN was trained with
        text_inputs=("input_ids", "attention_mask", "token_type_ids"),
        logit_scale=lambda m: float(1.0 / m.temperature.detach().reshape(-1)[0]),
        logit_bias=lambda m: None,
        dim=lambda c: int(c.projection_dim),
    ),
    "siglip": HFFamily(
        model_class="SiglipModel",
        score_kind="sigmoid",
        padding="max_length",  # SigLIP was trained on max_length padding, without a mask
        max_length=None,
        text_inputs=("input_ids",),
        logit_scale=_exp_scale,
        logit_bias=lambda m: float(m.logit_bias.detach().reshape(-1)[0]),
        dim=lambda c: int(c.text_config.hidden_size),
    ),
}


def _pooled(out: Any) -> torch.Tensor:
    """Features from get_*_features: a tensor in transformers 4.x, a ModelOutput whose
    ``pooler_output`` holds the projected embedding in 5.x."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected feature output {type(out).__name__}")


class HFEncoder:
    """A transformers CLIPModel / AlignModel / SiglipModel, frozen, in eval mode.

    ``source`` is a hub id (``openai/clip-vit-base-patch32``) or a local folder holding
    what ``save_pretrained`` writes for the model, its image processor and tokenizer.
    """

    def __init__(self, source: str, *, device: str = "cpu", name: str | None = None):
        import transformers
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        self.name = name or f"hf:{source}"
        self.device = device
        folder = Path(source).expanduser()
        local = folder.is_dir()
        if not local and _util.looks_like_path(source):
            raise ModelUnavailable(
                f"model {self.name!r}: folder {folder.resolve()} does not exist. Save a model "
                "there with `hf download <org/repo> --local-dir DIR` on a connected machine "
                "and copy it over"
            )
        src = str(folder.resolve()) if local else source
        repo = None if local else source
        kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
        try:
            with _util.quiet_transformers() if local else nullcontext():
                config = AutoConfig.from_pretrained(src, **kwargs)
                family = HF_FAMILIES.get(config.model_type)
                if family is None:
                    raise ConfigError(
                        f"model {self.name!r} is a {config.model_type!r} model; hf: supports the "
                        f"dual encoders {', '.join(HF_FAMILIES)} (use open_clip: for OpenCLIP "
                        "checkpoints)"
                    )
                model_cls = getattr(transformers, family.model_class)
                model = model_cls.from_pretrained(src, dtype=torch.float32, **kwargs)
                image_processor = AutoImageProcessor.from_pretrained(src, **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        except ImportError as exc:
            raise _util.missing_extra(self.name, exc) from exc
        except _util.load_errors() as exc:
            raise _util.unavailable(self.name, str(exc), repo=repo, scheme="hf") from exc
        self.family = family
        self.model_type: str = config.model_type
        self.model = model.to(device).eval()
        self.model.requires_grad_(False)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self.max_length = family.max_length or int(config.text_config.max_position_embeddings)
        self.score_kind = family.score_kind
        self.logit_scale = family.logit_scale(self.model)
        self.logit_bias = family.logit_bias(self.model)
        self.dim = family.dim(config)

    @cached_property
    def fingerprint(self) -> str:
        """Weights + image processor settings + tokenisation (not the folder's location)."""
        pp = self.image_processor.to_json_string()
        tok = f"{type(self.tokenizer).__name__}|{len(self.tokenizer)}|{self.family.padding}"
        return state_fingerprint(
            self.model, extra=f"hf|{self.model_type}|{pp}|{tok}|{self.max_length}"
        )

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        imgs = _util.check_images(images)
        out = []
        with torch.inference_mode():
            for batch in _util.batched(imgs, batch_size):
                pixels = self.image_processor(
                    images=[Image.fromarray(a) for a in batch], return_tensors="pt"
                )["pixel_values"]
                feats = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device)))
                out.append(feats.float().cpu().numpy())
        return _util.finish_embeddings(out, self.dim)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        items = _util.check_texts(texts)
        out = []
        with torch.inference_mode():
            for batch in _util.batched(items, batch_size):
                with self._tokenizer_lock:  # fast tokenizers are not re-entrant
                    enc = self.tokenizer(
                        list(batch),
                        padding=self.family.padding,
                        truncation=True,
                        max_length=self.max_length,
                        return_tensors="pt",
                    )
                inputs = {k: enc[k].to(self.device) for k in self.family.text_inputs if k in enc}
                feats = _pooled(self.model.get_text_features(**inputs))
                out.append(feats.float().cpu().numpy())
        return _util.finish_embeddings(out, self.dim)

    def __repr__(self) -> str:
        return f"HFEncoder({self.name!r}, family={self.model_type}, dim={self.dim})"

"""OpenCLIP models (OpenAI/LAION CLIP, BiomedCLIP, SigLIP ports, ...) behind the Encoder protocol.

Preprocessing is open_clip's own evaluation transform for the checkpoint (the transform
the weights were trained and evaluated with), applied to PIL images, so MedLens never
re-implements a model's resize/normalisation and cannot drift from it.
"""

from __future__ import annotations

import difflib
import json
import threading
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medlens.errors import ConfigError, ModelUnavailable
from medlens.models import _util
from medlens.models._state import state_fingerprint

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
CHECKPOINT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)


class OpenClipEncoder:
    """An open_clip model, frozen, in eval mode.

    ``model_name`` is a built-in architecture (``ViT-B-32``, then ``pretrained`` is a tag
    like ``openai`` or a checkpoint file), ``hf-hub:org/repo``, or a local folder in the
    hub layout (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``/``.safetensors``).
    With a built-in name and ``pretrained=None`` the weights are random (tests, training).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        *,
        device: str = "cpu",
        name: str | None = None,
    ):
        import open_clip

        self.name = name or (f"open_clip:{model_name}" + (f"@{pretrained}" if pretrained else ""))
        self.device = device
        ident, repo, needs_weights = self._resolve(model_name, pretrained)
        self.model_id = ident
        self.pretrained = pretrained
        try:
            if needs_weights:
                model, preprocess = open_clip.create_model_from_pretrained(
                    ident, pretrained, device=device
                )
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    ident, pretrained=None, device=device, pretrained_text=False
                )
            tokenizer = open_clip.get_tokenizer(ident)
        except ImportError as exc:
            raise _util.missing_extra(self.name, exc) from exc
        except _util.load_errors() as exc:
            raise _util.unavailable(self.name, str(exc), repo=repo, scheme="open_clip") from exc
        self.model: torch.nn.Module = model.eval()
        self.model.requires_grad_(False)
        self.preprocess: Callable[[Image.Image], torch.Tensor] = preprocess
        self.tokenizer: Any = tokenizer
        self._tokenizer_lock = threading.Lock()
        bias = getattr(model, "logit_bias", None)
        self.logit_bias: float | None = (
            None if bias is None else float(bias.detach().reshape(-1)[0])
        )
        # SigLIP-style checkpoints carry a bias and were trained with a sigmoid loss.
        self.score_kind = "sigmoid" if self.logit_bias is not None else "softmax"
        self.logit_scale = float(model.logit_scale.detach().exp().reshape(-1)[0].clamp(max=100.0))
        self.dim = int(self.embed_texts([""]).shape[1])

    @staticmethod
    def _resolve(model_name: str, pretrained: str | None) -> tuple[str, str | None, bool]:
        """(open_clip identifier, hub repo for offline advice, whether weights are required)."""
        import open_clip
        from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

        name = model_name.strip()
        if name.startswith(HF_HUB_PREFIX):
            return name, name[len(HF_HUB_PREFIX) :], True
        local = name[len(LOCAL_DIR_PREFIX) :] if name.startswith(LOCAL_DIR_PREFIX) else None
        if local is None and (Path(name).expanduser().is_dir() or _util.looks_like_path(name)):
            local = name
        if local is not None:
            folder = Path(local).expanduser()
            spec = f"open_clip:{local}"
            if not folder.is_dir():
                raise ModelUnavailable(
                    f"model {spec!r}: folder {folder.resolve()} does not exist. Copy an "
                    "OpenCLIP model there in the Hugging Face hub layout (open_clip_config.json + "
                    "open_clip_pytorch_model.bin or .safetensors), e.g. with "
                    "`hf download <org/repo> --local-dir DIR` on a connected machine"
                )
            if not (folder / "open_clip_config.json").is_file():
                raise ModelUnavailable(
                    f"model {spec!r}: {folder} has no open_clip_config.json; an OpenCLIP folder "
                    "needs the hub layout (open_clip_config.json + open_clip_pytorch_model.bin "
                    "or .safetensors)"
                )
            if not any((folder / c).is_file() for c in CHECKPOINT_NAMES):
                raise ModelUnavailable(
                    f"model {spec!r}: {folder} has no weights (expected one of "
                    f"{', '.join(CHECKPOINT_NAMES)})"
                )
            return f"{LOCAL_DIR_PREFIX}{folder.resolve()}", None, True
        arch = name.replace("/", "-")
        known = open_clip.list_models()
        if arch not in known:
            close = difflib.get_close_matches(arch, known, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown open_clip architecture {name!r}{hint} (open_clip.list_models() lists "
                "all; for hub models use open_clip:hf-hub:<org/repo>)"
            )
        if pretrained is None:
            return arch, None, False
        cfg = get_pretrained_cfg(arch, pretrained)
        if cfg:
            hub = str(cfg.get("hf_hub", "")).strip("/")
            repo = hub.rsplit("/", 1)[0] if hub.count("/") > 1 else hub or None
            return arch, repo, True
        if Path(pretrained).expanduser().is_file():
            return arch, None, True
        if _util.looks_like_path(pretrained):
            raise ModelUnavailable(
                f"model 'open_clip:{name}@{pretrained}': checkpoint file {pretrained} not found"
            )
        tags = list_pretrained_tags_by_model(arch)
        raise ConfigError(
            f"unknown pretrained tag {pretrained!r} for open_clip {arch}; known tags: "
            f"{', '.join(tags) if tags else 'none (give a checkpoint file)'}"
        )

    # -- the Encoder protocol --------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """Weights + the exact eval transform + tokenizer settings (not the file location,
        so a copied folder keeps its prompt caches)."""
        tok = type(self.tokenizer).__name__
        ctx = getattr(self.tokenizer, "context_length", "")
        # The eval transform is built from this config; JSON makes tuples and lists (as
        # read back from a folder's open_clip_config.json) hash alike.
        pp = json.dumps(
            getattr(self.model.visual, "preprocess_cfg", {}), sort_keys=True, default=str
        )
        return state_fingerprint(self.model, extra=f"open_clip|{pp}|{tok}:{ctx}")

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        imgs = _util.check_images(images)
        out = []
        with torch.inference_mode():
            for batch in _util.batched(imgs, batch_size):
                x = torch.stack([self.preprocess(Image.fromarray(a)) for a in batch])
                emb = self.model.encode_image(x.to(self.device), normalize=True)
                out.append(emb.float().cpu().numpy())
        return _util.finish_embeddings(out, getattr(self, "dim", 0))

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        items = _util.check_texts(texts)
        out = []
        with torch.inference_mode():
            for batch in _util.batched(items, batch_size):
                with self._tokenizer_lock:  # HF-backed tokenizers are not re-entrant
                    tokens = self.tokenizer(list(batch))
                emb = self.model.encode_text(tokens.to(self.device), normalize=True)
                out.append(emb.float().cpu().numpy())
        return _util.finish_embeddings(out, getattr(self, "dim", 0))

    def __repr__(self) -> str:
        return f"OpenClipEncoder({self.name!r}, dim={getattr(self, 'dim', '?')})"

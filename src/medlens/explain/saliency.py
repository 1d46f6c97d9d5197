"""Where the lite encoder looked: text-conditioned saliency and Grad-CAM.

Both work in the image's own geometry: the whole frame is resized so its shorter side is
the encoder's ``image_size`` (aspect kept, longer side at most twice that) and fed to the
fully convolutional MobileNetV2 tower without the centre crop ``analyze`` uses, so the
map covers every pixel of the image. (For a square image the input is exactly the
tensor ``analyze`` scores, before its test-time flips.)

- **Text-conditioned saliency** (``text_saliency``): the projection head is applied to
  the feature vector at each position of the last feature map (before pooling), and the
  unit result is compared with a target embedding by the scoring rule
  (``analysis.scoring.logits_from``): for a finding its prompt ensemble (minus the
  "normal study" reference for multi-label packs), for a free-text query the query's
  text embedding. No gradient; one forward pass.
- **Grad-CAM** (``gradcam``): pytorch-grad-cam's ``GradCAM`` on the last convolutional
  block of the image tower, the target being one finding's *calibrated score* computed by
  the same rule from the pooled embedding (``CalibratedScore``: the calibrated
  log-probability for a single-label pack, whose softmax lets every other finding move a
  probability; the logit for a multi-label one, where that gives the same map); one
  backward pass per target (one call per finding).
  For open_clip ViT towers (``vit_gradcam``) and transformers CLIP/SigLIP towers
  (``hf_vit_gradcam``): the last block's first LayerNorm, patch tokens reshaped to the
  patch grid (``vit_reshape``), on the encoder's own preprocessing. For a domain's
  supervised classifier (``classifier_gradcam``, the txv DenseNet121 chest X-ray model):
  its last dense block, for the output that scores the finding, since ``analyze``
  reports that classifier's probability.

Maps are returned min-max scaled to [0, 1] (``Saliency.map``, the image's (H, W)), with
the raw values on the feature grid kept in ``Saliency.grid``. The metrics at the end
(energy fractions, pointing game, centred-Gaussian baseline, rank correlation) are pure
functions over arrays.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medlens.analysis import scoring, zeroshot
from medlens.analysis.symptoms import normalised_text
from medlens.errors import ConfigError, InvalidText
from medlens.knowledge import KnowledgePack

# A query is a phrase ("blue-white veil"): MiniLM reads 128 tokens at most.
QUERY_MAX_CHARS = 300
METHODS = ("text", "gradcam")


@dataclass
class Saliency:
    """One explanation map for one image and one target."""

    map: np.ndarray  # (H, W) float32 in [0, 1], the image's geometry
    grid: np.ndarray  # (h, w) float32 raw values on the feature grid (text: logits / scale)
    method: str  # "text" | "gradcam"
    target: str  # finding id, or "query"
    label: str  # finding name or the query text

    def summary(self) -> dict[str, Any]:
        """The JSON view: the low-resolution map, its peak and the top-10 % energy."""
        low = scale01(self.grid)
        r, c = np.unravel_index(int(np.argmax(self.map)), self.map.shape)
        gr, gc = np.unravel_index(int(np.argmax(low)), low.shape)
        return {
            "method": self.method,
            "target": self.target,
            "label": self.label,
            "grid_shape": list(low.shape),
            "grid": np.round(low.astype(np.float64), 4).tolist(),
            "grid_raw": np.round(self.grid.astype(np.float64), 5).tolist(),
            "peak": {
                "grid": [int(gr), int(gc)],
                "pixel": [int(r), int(c)],
                "relative": [
                    round(float(r) / self.map.shape[0], 4),
                    round(float(c) / self.map.shape[1], 4),
                ],
            },
            "top10_energy": round(top_energy_fraction(self.map, 0.10), 4),
        }


# -- inputs -------------------------------------------------------------------------------
def clean_query(text: str | None) -> str:
    """A usable free-text query or a clear error (empty, too long, binary)."""
    text = normalised_text(
        text,
        QUERY_MAX_CHARS,
        what="the query",
        not_text="the query must be text",
        empty='the query is empty: describe what to look for, e.g. "blue-white veil"',
        too_long=": name one visual sign or finding",
    )
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Co", "Cs"} for ch in text):
        raise InvalidText("the query contains control or non-printing characters")
    return text


def _check_lite(encoder: Any) -> None:
    if getattr(encoder, "name", None) != "lite" or not hasattr(encoder, "image_head"):
        raise ConfigError(
            "text saliency is implemented for the lite encoder only so far (open_clip "
            "and hf: ViT towers have Grad-CAM: --method gradcam); use --model lite"
        )


def frame_tensor(encoder: Any, pixels: np.ndarray) -> torch.Tensor:
    """(1, 3, h, w) model input for the whole frame: shorter side → ``image_size``
    (antialiased, aspect kept, longer side capped at twice that), then the encoder's own
    normalisation (colour constancy, ImageNet statistics)."""
    from medlens.models.mobilenet import resize_uint8

    arr = np.asarray(pixels)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InvalidText("pixels must be uint8 (H, W, 3)")  # pragma: no cover - io guarantees
    h, w = arr.shape[:2]
    s = int(encoder.image_size)
    k = s / min(h, w)
    th, tw = (min(2 * s, max(s, round(h * k))), min(2 * s, max(s, round(w * k))))
    t = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1)  # PIL arrays: read-only
    return encoder.normalise(resize_uint8(t, (th, tw))[None])


def _split(encoder: Any) -> tuple[Any, nn.Sequential]:
    """(frozen prefix as a function, the conv blocks after it) of the image tower; the
    last of those blocks is the last convolutional block Grad-CAM hooks."""
    if encoder.image_tail is not None:
        return encoder.prefix_forward, encoder.image_tail[0]
    blocks = encoder.image_tower()[0]  # the shared frozen MobileNetV2 .features
    n = len(blocks) - 1

    def prefix(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return blocks[:n](x.contiguous(memory_format=torch.channels_last))

    return prefix, blocks[n:]


def feature_map(encoder: Any, x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) last feature map of the image tower (before pooling)."""
    prefix, rest = _split(encoder)
    with torch.no_grad():
        return rest(prefix(x)).float()


def position_embeddings(encoder: Any, fmap: torch.Tensor) -> np.ndarray:
    """(h·w, dim) unit embeddings: the image projection head applied at each position."""
    n, c, h, w = fmap.shape
    if n != 1:
        raise ValueError("one image at a time")
    flat = fmap[0].permute(1, 2, 0).reshape(h * w, c)
    with encoder._eval_heads(), torch.no_grad():
        emb, _ = encoder.embed_from_features(img_feats=flat)
    return emb.float().cpu().numpy()


# -- targets ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What a map is about: a unit embedding (+ the multi-label reference) and a name."""

    key: str  # finding id or "query"
    label: str
    embedding: np.ndarray  # (dim,)
    reference: np.ndarray | None = None  # (dim,) for multi-label packs' findings


def _scoring_lookup(
    encoder: Any, pack: KnowledgePack, finding_id: str, cache_dir: Path | None
) -> tuple[Any, int, np.ndarray, np.ndarray | None]:
    """The finding (ConfigError for an unknown id), its column, and the scoring rule's
    finding embeddings and multi-label reference: what every map of a finding starts from."""
    f = pack.finding(finding_id)
    cls, ref = zeroshot.scoring_embeddings(encoder, pack, cache_dir)
    return f, pack.finding_ids.index(f.id), cls, ref


def finding_target(
    encoder: Any, pack: KnowledgePack, finding_id: str, cache_dir: Path | None = None
) -> Target:
    """A finding's prompt-ensemble embedding, as ``analysis.scoring`` uses it."""
    f, k, cls, ref = _scoring_lookup(encoder, pack, finding_id, cache_dir)
    return Target(f.id, f.name, cls[k], ref)


def query_target(encoder: Any, query: str) -> Target:
    """A free-text query's own text embedding (no reference)."""
    q = clean_query(query)
    return Target("query", q, np.asarray(encoder.embed_texts([q])[0], dtype=np.float32))


# -- the two methods ----------------------------------------------------------------------
def text_saliency(encoder: Any, pixels: np.ndarray, target: Target) -> Saliency:
    """Similarity of the target and each spatial position of the last feature map, by
    the scoring rule (``scoring.logits_from``, divided by the logit scale: cosines, or
    cosine differences to the reference), upsampled to the image."""
    return text_saliencies(encoder, pixels, [target])[0]


def text_saliencies(encoder: Any, pixels: np.ndarray, targets: list[Target]) -> list[Saliency]:
    """``text_saliency`` for several targets from one forward pass."""
    _check_lite(encoder)
    fmap = feature_map(encoder, frame_tensor(encoder, pixels))
    h, w = fmap.shape[2:]
    pos = position_embeddings(encoder, fmap)
    out = []
    for t in targets:
        grid = scoring.logits_from(pos, t.embedding[None], 1.0, t.reference)[:, 0]
        grid = grid.reshape(h, w).astype(np.float32)
        out.append(Saliency(upsample(grid, pixels.shape[:2]), grid, "text", t.key, t.label))
    return out


class FindingLogits(nn.Module):
    """The lite image path as a classifier for pytorch-grad-cam: ``forward`` takes only
    the image and returns (N, K) finding logits by the scoring rule, from the pooled,
    projected, unit embedding."""

    def __init__(self, encoder: Any, targets: np.ndarray, reference: np.ndarray | None):
        super().__init__()
        self.encoder = encoder
        self.prefix, self.blocks = _split(encoder)
        self.register_buffer("targets", torch.as_tensor(np.asarray(targets), dtype=torch.float32))
        ref = None if reference is None else torch.as_tensor(reference, dtype=torch.float32)
        self.register_buffer("reference", ref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prefix(x).detach().requires_grad_(True)  # grads start here, never below
        pooled = self.blocks(h).float().mean(dim=(2, 3))
        emb = F.normalize(self.encoder.image_head(pooled), dim=-1)
        scale = float(self.encoder.logit_scale)
        z = scale * emb @ self.targets.T
        if self.reference is not None:
            z = z - scale * (emb @ self.reference)[:, None]
        return z


class CalibratedScore(nn.Module):
    """A finding-logits module whose outputs are the scores ``analyze`` calibrates: for a
    single-label pack log softmax((z + b) / T), the log of the probability the user sees
    (Grad-CAM of a raw logit also credits evidence that raises every finding alike, which
    the softmax cancels); for a multi-label pack the logit itself (each probability is
    an increasing function of its own logit, so Grad-CAM's map is the same)."""

    def __init__(self, logits: nn.Module, pack: KnowledgePack, calibration: Any):
        super().__init__()
        self.logits = logits
        self.single = pack.task != "multi_label"
        bias = calibration.bias_for(pack.id, pack.finding_ids) if self.single else 0.0
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))
        self.temperature = float(calibration.temperature_for(pack.id))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        return F.log_softmax((z + self.bias) / self.temperature, dim=-1) if self.single else z


def _scored(model: nn.Module, pack: KnowledgePack, calibration: Any | None) -> nn.Module:
    return model if calibration is None else CalibratedScore(model, pack, calibration)


def _cam(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, k: int, reshape: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam at ``layer`` for output ``k`` of ``model``: the signed
    low-resolution CAM (its weights × activations, (gh, gw)) and its own map at the
    input's size (positive part, scaled)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with (
        torch.enable_grad(),
        GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam,
    ):
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(k)])[0]
        acts = cam.activations_and_grads.activations[-1].cpu().numpy()
        grads = cam.activations_and_grads.gradients[-1].cpu().numpy()
    weights = grads.mean(axis=(2, 3), keepdims=True)
    return (weights * acts).sum(axis=1)[0].astype(np.float32), out.astype(np.float32)


def gradcam(
    encoder: Any,
    pixels: np.ndarray,
    pack: KnowledgePack,
    finding_id: str,
    cache_dir: Path | None = None,
    calibration: Any | None = None,
) -> Saliency:
    """Grad-CAM (pytorch-grad-cam) on the last convolutional block for one finding's
    calibrated score (``CalibratedScore``; the raw logit without ``calibration``); one
    backward pass for this one target."""
    _check_lite(encoder)
    f, k, cls, ref = _scoring_lookup(encoder, pack, finding_id, cache_dir)
    model = FindingLogits(encoder, cls, ref)
    x = frame_tensor(encoder, pixels)
    was_training = encoder.training
    try:
        signed, out = _cam(_scored(model, pack, calibration), model.blocks[-1], x, k)
    finally:
        encoder.zero_grad(set_to_none=True)
        encoder.train(was_training)
    grid = np.maximum(signed, 0)
    return Saliency(upsample(out, pixels.shape[:2]), grid, "gradcam", f.id, f.name)


# -- Grad-CAM for open_clip ViT towers ----------------------------------------------------
def is_open_clip_vit(encoder: Any) -> bool:
    """An open_clip encoder whose image tower is a VisionTransformer (patch tokens)."""
    visual = getattr(getattr(encoder, "model", None), "visual", None)
    return (
        getattr(encoder, "name", "").startswith("open_clip")
        and hasattr(visual, "transformer")
        and hasattr(visual, "grid_size")
    )


def vit_reshape(grid_size: tuple[int, int], batch_first: bool = True):
    """pytorch-grad-cam's ``reshape_transform`` for ViT tokens: (N, L, C) (or (L, N, C))
    → (N, C, gh, gw), dropping the class (and any other prefix) tokens."""
    gh, gw = (int(g) for g in grid_size)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if not batch_first:
            t = t.transpose(0, 1)
        t = t[:, -gh * gw :, :]
        return t.reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)

    return reshape


class EmbeddingLogits(nn.Module):
    """An image tower (``tower(x)`` = the image embedding before normalisation, e.g.
    open_clip's ``model.visual``) as a classifier for pytorch-grad-cam: ``forward`` takes
    only the image and returns (N, K) finding logits by the scoring rule from the unit embedding."""

    def __init__(
        self, tower: nn.Module, targets: np.ndarray, reference: np.ndarray | None, scale: float
    ):
        super().__init__()
        self.tower, self.scale = tower, float(scale)
        self.register_buffer("targets", torch.as_tensor(np.asarray(targets), dtype=torch.float32))
        ref = None if reference is None else torch.as_tensor(reference, dtype=torch.float32)
        self.register_buffer("reference", ref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = F.normalize(self.tower(x).float(), dim=-1)
        z = self.scale * emb @ self.targets.T
        if self.reference is not None:
            z = z - self.scale * (emb @ self.reference)[:, None]
        return z


def _centre_square(grid_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A map of the centred square crop (open_clip's resize-shortest + centre crop) put
    back into the image's (H, W) geometry; zero outside the crop, scaled to [0, 1]."""
    h, w = (int(s) for s in shape)
    side = min(h, w)
    out = np.zeros((h, w), np.float32)
    top, left = (h - side) // 2, (w - side) // 2
    out[top : top + side, left : left + side] = upsample(grid_map, (side, side))
    return scale01(out)


def _token_cam(
    model: nn.Module,
    layer: nn.Module,
    grid: tuple[int, int],
    x: torch.Tensor,
    k: int,
    pack: KnowledgePack,
    calibration: Any | None,
    batch_first: bool = True,
) -> np.ndarray:
    """The signed Grad-CAM (gh, gw) of ViT tokens at ``layer`` for output ``k`` of
    ``model`` (calibrated as ``_scored`` does); patch tokens reshaped by ``vit_reshape``."""
    x.requires_grad_(True)  # the tower's weights are frozen: gradients start at the input
    reshape = vit_reshape(grid, batch_first)
    return _cam(_scored(model, pack, calibration), layer, x, k, reshape)[0]


def vit_gradcam(
    encoder: Any,
    pixels: np.ndarray,
    pack: KnowledgePack,
    finding_id: str,
    cache_dir: Path | None = None,
    calibration: Any | None = None,
) -> Saliency:
    """Grad-CAM on the last transformer block's first LayerNorm of an open_clip ViT
    (patch tokens reshaped to the patch grid), target one finding's calibrated score by
    the scoring rule from the unit image embedding (as ``gradcam``); the image goes
    through the encoder's own eval transform (centre crop), and the map is put back
    into the image's geometry."""
    from PIL import Image

    if not is_open_clip_vit(encoder):
        raise ConfigError("vit_gradcam needs an open_clip encoder with a ViT image tower")
    f, k, cls, ref = _scoring_lookup(encoder, pack, finding_id, cache_dir)
    visual = encoder.model.visual
    model = EmbeddingLogits(visual, cls, ref, encoder.logit_scale)  # encode_image = visual
    x = encoder.preprocess(Image.fromarray(np.asarray(pixels)))[None].to(encoder.device)
    layer = visual.transformer.resblocks[-1].ln_1
    batch_first = getattr(visual.transformer, "batch_first", True)
    signed = _token_cam(model, layer, visual.grid_size, x, k, pack, calibration, batch_first)
    # ``grid`` keeps the signed CAM (a map can have no positive part: then it is all zero)
    heat = _centre_square(np.maximum(signed, 0), pixels.shape[:2])
    return Saliency(heat, signed, "gradcam", f.id, f.name)


# -- Grad-CAM for transformers ViT towers (hf: CLIP, SigLIP) ------------------------------
def is_hf_vit(encoder: Any) -> bool:
    """An ``hf:`` encoder whose vision tower is a ViT (patch embedding + encoder layers):
    CLIP and SigLIP; ALIGN's EfficientNet is not."""
    vision = getattr(getattr(encoder, "model", None), "vision_model", None)
    return (
        getattr(encoder, "name", "").startswith("hf:")
        and hasattr(getattr(vision, "embeddings", None), "patch_embedding")
        and hasattr(getattr(vision, "encoder", None), "layers")
    )


class HFImageFeatures(nn.Module):
    """``get_image_features`` of a transformers dual encoder as a module (pixel values →
    the projected image embedding before normalisation)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from medlens.models.hf_encoder import _pooled

        return _pooled(self.model.get_image_features(pixel_values=x))


def hf_vit_gradcam(
    encoder: Any,
    pixels: np.ndarray,
    pack: KnowledgePack,
    finding_id: str,
    cache_dir: Path | None = None,
    calibration: Any | None = None,
) -> Saliency:
    """Grad-CAM for an ``hf:`` CLIP or SigLIP image tower, as ``vit_gradcam``: the last
    encoder layer's first LayerNorm, patch tokens on the patch grid (CLIP's class token
    dropped), target the finding's calibrated score from the unit image embedding; the
    image goes through the model's own image processor, and the map back into the
    image's geometry (the centre square when the processor crops, the whole frame when
    it resizes to a square, as SigLIP's does)."""
    from PIL import Image

    if not is_hf_vit(encoder):
        raise ConfigError(
            "hf_vit_gradcam needs an hf: encoder with a ViT vision tower (CLIP, SigLIP); "
            "ALIGN's EfficientNet tower has no Grad-CAM here yet"
        )
    f, k, cls, ref = _scoring_lookup(encoder, pack, finding_id, cache_dir)
    model = EmbeddingLogits(HFImageFeatures(encoder.model), cls, ref, encoder.logit_scale)
    proc = encoder.image_processor
    x = proc(images=[Image.fromarray(np.asarray(pixels))], return_tensors="pt")["pixel_values"]
    x = x.to(encoder.device)
    patch = int(encoder.model.config.vision_config.patch_size)
    grid = (x.shape[2] // patch, x.shape[3] // patch)
    layer = encoder.model.vision_model.encoder.layers[-1].layer_norm1
    signed = _token_cam(model, layer, grid, x, k, pack, calibration)
    positive = np.maximum(signed, 0)
    if getattr(proc, "do_center_crop", False):
        heat = _centre_square(positive, pixels.shape[:2])
    else:
        heat = upsample(positive, pixels.shape[:2])
    return Saliency(heat, signed, "gradcam", f.id, f.name)


# -- Grad-CAM for a supervised classifier (txv DenseNet121) -------------------------------
def classifier_gradcam(classifier: Any, pixels: np.ndarray, finding_id: str) -> Saliency:
    """Grad-CAM of a torchxrayvision DenseNet121 (``models.txv``) on its last dense
    block's output (``features[-1]``) for the output that scores ``finding_id``; the
    target is that output's logit, whose sigmoid is the probability ``analyze`` reports
    for the finding. The classifier sees the centre square (txv preprocessing), so the
    map is put back there."""
    from medlens.knowledge import load_domain
    from medlens.models.txv import TxvClassifier, preprocess

    if not isinstance(classifier, TxvClassifier):
        raise ConfigError("Grad-CAM for a supervised classifier supports txv: DenseNet121 only")
    col = classifier.findings.get(finding_id)
    if col is None:
        raise ConfigError(
            f"the classifier {classifier.name} does not score {finding_id!r}; it scores "
            f"{', '.join(sorted(classifier.findings))}"
        )
    model = classifier.model
    x = preprocess([np.asarray(pixels)]).to(classifier.device)
    try:
        signed = _cam(model, model.features[-1], x, col)[0]
    finally:
        model.zero_grad(set_to_none=True)  # nothing left behind on the shared classifier
    heat = _centre_square(np.maximum(signed, 0), pixels.shape[:2])
    f = load_domain(classifier.domain).finding(finding_id)
    return Saliency(heat, signed, "gradcam", f.id, f.name)


def explain(
    encoder: Any,
    pixels: np.ndarray,
    pack: KnowledgePack,
    *,
    finding: str | None = None,
    query: str | None = None,
    method: str = "text",
    cache_dir: Path | None = None,
    calibration: Any | None = None,
    classifier: Any | None = None,
) -> Saliency:
    """One map: for ``finding`` (text saliency or Grad-CAM, whose target is the finding's
    score under ``calibration``, the model card's) or for a free-text ``query`` (text
    saliency only). With the domain's supervised ``classifier``, a finding it scores is
    explained by Grad-CAM of that classifier: ``analyze`` reports its probability."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if (finding is None) == (query is None):
        raise ConfigError("explain one target: a finding id or a query, not both or neither")
    if query is not None:
        if method != "text":
            raise ConfigError("a free-text query is explained by text saliency (--method text)")
        return text_saliency(encoder, pixels, query_target(encoder, query))
    if method == "gradcam":
        if classifier is not None and finding in getattr(classifier, "findings", {}):
            return classifier_gradcam(classifier, pixels, finding)
        if is_open_clip_vit(encoder):
            return vit_gradcam(encoder, pixels, pack, finding, cache_dir, calibration)
        if is_hf_vit(encoder):
            return hf_vit_gradcam(encoder, pixels, pack, finding, cache_dir, calibration)
        return gradcam(encoder, pixels, pack, finding, cache_dir, calibration)
    return text_saliency(encoder, pixels, finding_target(encoder, pack, finding, cache_dir))


# -- pure functions over arrays -----------------------------------------------------------
def scale01(a: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1] (a constant map becomes zeros); NaN-free."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float32))
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi - lo <= 1e-12 else (a - lo) / (hi - lo)


def upsample(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to ``shape``, min-max scaled to [0, 1]."""
    t = torch.as_tensor(np.asarray(grid, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=tuple(int(s) for s in shape), mode="bilinear", align_corners=False)
    return scale01(up[0, 0].numpy())


def top_energy_fraction(m: np.ndarray, frac: float = 0.10) -> float:
    """Share of a non-negative map's total mass in its top ``frac`` of pixels."""
    v = np.sort(np.clip(np.asarray(m, dtype=np.float64).ravel(), 0, None))[::-1]
    total = v.sum()
    if total <= 0:
        return float("nan")
    return float(v[: max(1, round(frac * v.size))].sum() / total)


def energy_inside(m: np.ndarray, mask: np.ndarray) -> float:
    """Share of a non-negative map's mass inside a boolean mask of the same shape."""
    m = np.clip(np.asarray(m, dtype=np.float64), 0, None)
    total = m.sum()
    return float("nan") if total <= 0 else float(m[np.asarray(mask, bool)].sum() / total)


def pointing_hit(m: np.ndarray, mask: np.ndarray) -> bool:
    """Pointing game: is the map's maximum inside the mask?"""
    idx = np.unravel_index(int(np.argmax(m)), np.shape(m))
    return bool(np.asarray(mask, bool)[idx])


def centred_gaussian(shape: tuple[int, int], sigma: float = 0.25, mass: float = 1.0) -> np.ndarray:
    """A centred Gaussian map (sd ``sigma`` × each side) with total ``mass``: the
    baseline a lesion-centred photograph gives for free."""
    h, w = (int(s) for s in shape)
    y = (np.arange(h) + 0.5 - h / 2) / (sigma * h)
    x = (np.arange(w) + 0.5 - w / 2) / (sigma * w)
    g = np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))
    return (g * (mass / g.sum())).astype(np.float32)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps' pixels."""
    from scipy.stats import spearmanr

    rho = spearmanr(np.ravel(a), np.ravel(b)).statistic
    return float(rho) if np.isfinite(rho) else float("nan")

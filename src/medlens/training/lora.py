"""LoRA fine-tuning of open_clip and transformers CLIP encoders on image–text pairs.

Why LoRA: a production encoder (BiomedCLIP, CLIP ViT-B) is far too large to fine-tune on
a few thousand sample images, but low-rank adapters on the transformer blocks' attention
and MLP layers (r=32, alpha=64, as the explainable-dermatology prototype used) adapt it
with ~1 % of the parameters while the pretrained weights stay untouched. The projection
heads and the logit scale train fully; everything else is frozen.

The objective is CLIP's symmetric InfoNCE at the model's own (learned) logit scale;
identical texts in a batch count as positives of each other (several images share a
finding prompt). Images go through the encoder's *own* evaluation preprocessing, after
an optional uint8-level augmentation, so training and inference see the same transform.

``pairs_from_datasets`` builds pairs from the sample datasets: each image with a random
phrasing of its finding from the knowledge packs, PAD-UFES-20 images also with their
symptom sentence and COVID-19 images with their clinical notes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medlens.errors import ConfigError
from medlens.models.lora import (  # noqa: F401  (re-exported: the training API)
    ADAPTER_FILE,
    DEFAULT_TARGETS,
    HEAD_PATTERNS,
    RECIPE_FILE,
    LoraMultiheadAttention,
    _Family,
    _matches,
    _refresh,
    adapter_state,
    inject_lora,
    load_adapter,
)


@dataclass
class LoraRecipe:
    r: int
    alpha: int
    targets: str | list[str]
    epochs: int
    lr: float
    batch_size: int
    seed: int
    weight_decay: float
    dropout: float


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, texts: Sequence[str]):
    """Symmetric InfoNCE; pairs whose texts are identical are all positives (soft targets)."""
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    key = torch.tensor([ids[t] for t in texts])
    same = (key[:, None] == key[None, :]).float().to(img.device)
    target = same / same.sum(1, keepdim=True)
    logits = scale * img @ txt.T
    loss_i = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(logits.T, 1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def _pair_parts(pair: Sequence[Any]) -> tuple[np.ndarray, str, str | None]:
    if len(pair) == 2:
        return pair[0], pair[1], None
    return pair[0], pair[1], pair[2]


def train_lora(
    encoder: Any,
    pairs: Sequence[Sequence[Any]],
    *,
    r: int = 32,
    alpha: int = 64,
    targets: str | list[str] | None = None,
    epochs: int = 3,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    weight_decay: float = 0.0,
    dropout: float = 0.0,
    augment: Callable[[np.ndarray, str | None], np.ndarray] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Adapt ``encoder`` (open_clip or hf CLIP) in place with LoRA on image–text ``pairs``.

    ``pairs``: (uint8 RGB array, text) or (array, text, domain) tuples; ``domain`` is
    passed to ``augment``. ``targets``: peft target modules (a regex over full module
    names, or a list of name suffixes); default ``DEFAULT_TARGETS`` for the family.
    Data order and augmentation are seeded, so a run is reproducible. Afterwards the
    encoder embeds with the adapters (unmerged; its fingerprint and logit scale are
    refreshed). Returns the recipe, per-step and per-epoch loss history, and the names
    of the trainable parameters.
    """
    fam = _Family(encoder)
    if len(pairs) < 2:
        raise ConfigError("LoRA training needs at least two image–text pairs")
    if batch_size < 2:
        raise ConfigError("contrastive training needs batches of at least two pairs")
    target = targets if targets is not None else DEFAULT_TARGETS[fam.kind]
    recipe = LoraRecipe(r, alpha, target, epochs, lr, batch_size, seed, weight_decay, dropout)
    model = fam.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # adapter initialisation is part of the recipe
        adapted = inject_lora(model, target, r, alpha, dropout)
    if not adapted:
        raise ConfigError(f"LoRA target {target!r} matched no module of {encoder.name}")
    heads = re.compile(HEAD_PATTERNS[fam.kind])
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or bool(heads.match(name)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    steps = math.ceil(len(pairs) / batch_size)
    history: dict[str, list] = {"step": [], "epoch": []}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # augmentation draws from torch's generator
        model.train()
        try:
            for epoch in range(epochs):
                order = rng.permutation(len(pairs))
                losses = []
                for b in range(steps):
                    idx = order[b * batch_size : (b + 1) * batch_size]
                    if len(idx) < 2:
                        continue  # one pair has no negatives
                    parts = [_pair_parts(pairs[i]) for i in idx]
                    ims = [augment(im, d) if augment else im for im, _, d in parts]
                    texts = [t for _, t, _ in parts]
                    img, txt = fam.encode(fam.pixels(ims), fam.tokens(texts))
                    loss = clip_loss(img, txt, fam.logit_scale(), texts)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                    if progress:
                        progress(epoch, losses[-1])
                history["step"].extend(losses)
                history["epoch"].append(float(np.mean(losses)))
        finally:
            model.eval()
            model.requires_grad_(False)
    _refresh(encoder)
    return {
        "recipe": asdict(recipe),
        "loss": history,
        "adapted_modules": adapted,
        "trainable": trainable,
        "n_trainable": int(sum(p.numel() for n, p in model.named_parameters() if n in trainable)),
        "n_total": int(sum(p.numel() for p in model.parameters())),
        "n_pairs": len(pairs),
    }


# -- pairs from the sample datasets --------------------------------------------------------
@dataclass
class BalanceRecipe:
    """Majority classes undersampled to ``cap`` images, minority classes oversampled (with
    replacement) up to ``floor`` images; classes are (dataset, finding)."""

    cap: int = 1000
    floor: int = 100
    seed: int = 0


def balance_indices(
    classes: Sequence[str], recipe: BalanceRecipe
) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """Indices into ``classes`` after balancing, and per-class counts before/after."""
    rng = np.random.default_rng(recipe.seed)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    out: list[int] = []
    counts: dict[str, dict[str, int]] = {}
    for c in sorted(by_class):
        idx = np.array(by_class[c])
        if len(idx) > recipe.cap:
            idx = rng.choice(idx, recipe.cap, replace=False)
        elif len(idx) < recipe.floor:
            idx = np.concatenate([idx, rng.choice(idx, recipe.floor - len(idx), replace=True)])
        out.extend(int(i) for i in np.sort(idx))
        counts[c] = {"before": len(by_class[c]), "after": len(idx)}
    return np.array(out, dtype=int), counts


AUGMENT_VERSION = "aug2"  # bump when make_augment's transforms change (keys cached views)


def colour_stretch(x: torch.Tensor, gain: tuple[float, float] = (1.3, 2.4)) -> torch.Tensor:
    """Contrast stretch per channel about the image's own channel mean, then clip, on
    uint8 (C, H, W). Why: images reach MedLens after unknown export pipelines; the ISIC
    2018 test copy in the sample data, for one, was stretched until ~17 % of its pixels
    clip at 255 (shared/data README). Training on such views keeps lesion colour cues
    usable when contrast and saturation are pushed to clipping."""
    g = torch.empty(x.shape[0], 1, 1).uniform_(*gain)
    f = x.float()
    mean = f.mean(dim=(1, 2), keepdim=True)
    return ((f - mean) * g + mean).round().clamp(0, 255).to(torch.uint8)


def low_resolution(x: torch.Tensor, sides: tuple[int, int] = (24, 72)) -> torch.Tensor:
    """Down- then up-sample uint8 (C, H, W) to a random shorter side in ``sides``. Why:
    the dermoscopy in the sample data is HAM10000 at 28 px, the photos are sharp; without
    this, sharpness alone tells the model which dataset (and so which priors) it sees."""
    from torchvision.transforms.v2 import functional as TF

    side = int(torch.randint(sides[0], sides[1] + 1, ()).item())
    h, w = x.shape[-2:]
    if min(h, w) <= side:
        return x
    small = TF.resize(x, [side], antialias=True)
    return TF.resize(small, [h, w], antialias=True)


def _flips(domain: str | None) -> list[Any] | None:
    """Random flips a domain's images may take, from its pack's ``test_time_flips``; None
    = a canonical orientation (no flips declared). Any two of horizontal, vertical and
    both (a 180° turn) generate all of them; ``None`` (no domain known) = any flip."""
    from torchvision.transforms import v2

    if domain is None:
        declared = {"horizontal", "vertical", "both"}
    else:
        from medlens.knowledge import load_domain

        declared = set(load_domain(domain).domain.test_time_flips)
    if not declared:
        return None
    if len(declared) >= 2:
        return [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if declared == {"horizontal"}:
        return [v2.RandomHorizontalFlip()]
    if declared == {"vertical"}:
        return [v2.RandomVerticalFlip()]
    return [v2.RandomApply([v2.RandomHorizontalFlip(1.0), v2.RandomVerticalFlip(1.0)])]


def make_augment(seed_size: int = 448) -> Callable[[np.ndarray, str | None], np.ndarray]:
    """torchvision v2 augmentation on uint8 arrays, per domain, decided by its knowledge
    pack: a domain without a canonical orientation (one with ``test_time_flips``, e.g.
    dermatology photos) may be flipped along those axes, rotated freely, colour-jittered,
    contrast-stretched to clipping and blurred to low resolution; a domain with a
    canonical orientation (no ``test_time_flips``, e.g. chest X-rays: a flipped chest puts
    the heart on the wrong side) only gets mild crops, rotations and brightness/contrast.
    Output side = the input's shorter side (capped at ``seed_size``)."""
    from torchvision.transforms import v2

    def build(domain: str | None, size: int) -> Any:
        flips = _flips(domain)
        if flips is None:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
                    v2.RandomRotation(7),
                    v2.ColorJitter(brightness=0.15, contrast=0.15),
                ]
            )
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
                v2.RandomRotation(30),
                *flips,
                v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
                v2.RandomApply([v2.Lambda(colour_stretch)], p=0.3),
                v2.RandomApply([v2.Lambda(low_resolution)], p=0.25),
            ]
        )

    def augment(image: np.ndarray, domain: str | None) -> np.ndarray:
        size = int(min(image.shape[0], image.shape[1], seed_size))
        arr = image if image.flags.writeable else image.copy()  # torch wants writable memory
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        out = build(domain, size)(t)
        return np.ascontiguousarray(out.permute(1, 2, 0).numpy())

    return augment


def pairs_from_datasets(
    data: Sequence[str] | None = None,
    split: str | None = "train",
    *,
    limit: int | None = None,
    balance: BalanceRecipe | None = None,
    free_text: bool = True,
    seed: int = 0,
) -> tuple[list[tuple[np.ndarray, str, str]], dict[str, Any]]:
    """(image, text, domain) pairs and the recipe that made them.

    Every labelled image is paired with a random phrasing of its (first) finding from the
    knowledge pack; with ``free_text``, images that carry text (PAD-UFES-20 symptom
    sentences, COVID-19 clinical notes) are paired with it as well. ``limit`` takes that
    many records per dataset, evenly spaced; ``balance`` resamples per (dataset, finding).
    ``split=None`` takes every split (datasets without splits, like ``cxr_samples``).
    ``data`` defaults to every knowledge pack's ``training_datasets``.
    """
    from medlens.datasets import load_dataset
    from medlens.evaluation.protocols import select_records
    from medlens.knowledge import load_domain, training_datasets

    data = training_datasets() if data is None else data

    rng = np.random.default_rng(seed)
    items: list[tuple[Any, Any, str, str]] = []  # (manifest, record, finding, domain)
    for name in data:
        manifest = load_dataset(name)
        pack = load_domain(manifest.domain)
        for rec in select_records(manifest, split, limit):
            fids = pack.findings_for(manifest.vocab_of(rec), rec.labels)
            if fids:
                items.append((manifest, rec, fids[0], pack.id))
    classes = [f"{m.name}:{f}" for m, _, f, _ in items]
    counts = dict(Counter(classes))
    if balance is not None:
        keep, counts = balance_indices(classes, balance)
        items = [items[i] for i in keep]
    pairs: list[tuple[np.ndarray, str, str]] = []
    n_free = 0
    for manifest, rec, fid, domain in items:
        image = manifest.image(rec)
        prompts = load_domain(domain).finding(fid).prompts
        pairs.append((image, str(prompts[int(rng.integers(len(prompts)))]), domain))
        if free_text and rec.text:
            pairs.append((image, rec.text, domain))
            n_free += 1
    recipe = {
        "data": list(data),
        "split": split,
        "limit": limit,
        "seed": seed,
        "balance": asdict(balance) if balance else None,
        "class_counts": counts,
        "n_pairs": len(pairs),
        "n_free_text_pairs": n_free,
    }
    return pairs, recipe

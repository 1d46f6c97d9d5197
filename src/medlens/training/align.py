"""Align the lite encoder on the sample datasets' train splits.

Two recipes share one objective:

- *tuned* (the default): the image tower's last blocks (``tune_from`` on) train with the
  heads, with majority undersampling and minority oversampling redrawn every epoch. The
  frozen prefix's output is cached once per image and *view*: view 0 is the inference
  transform, views 1..``views`` are torchvision v2 augmentations (per domain, fixed
  seeds); each training step draws one view per image. On a CPU this makes
  augmentation cost a few prefix passes per image in total instead of one per epoch.
- *heads-only* (``tune_from=None``): the backbones stay frozen, their features are cached
  once, and only the two projection heads and the logit scale train, with class weights.

The objective is CLIP-style contrastive alignment with label-aware targets, built per
knowledge pack (``knowledge.domains()``) from the pack's ``task``, so a new domain is a
new YAML file and no code:

- images against their finding's prompt ensemble: softmax cross-entropy over the pack's
  findings for a ``single_label`` pack (dermatology), per-finding sigmoid against the
  pack's "normal study" reference for a ``multi_label`` pack (chest X-ray), masked to the
  findings each dataset actually labels,
- images against their domain's prompts (so ``domain=auto`` works),
- images against their own free text (COVID-19 clinical notes, PAD-UFES-20 symptom
  sentences) with a symmetric InfoNCE whose targets treat identical texts as positives.

Exactly the same prompt ensembles are used at inference (``analysis.zeroshot``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medlens.analysis import scoring
from medlens.datasets import load_dataset
from medlens.datasets.manifest import Manifest, Record
from medlens.errors import ConfigError
from medlens.knowledge import KnowledgePack, domains, load_domain, training_datasets


@dataclass
class AlignConfig:
    # Default: every knowledge pack's ``training_datasets``.
    data: tuple[str, ...] = field(default_factory=training_datasets)
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 512
    seed: int = 0
    balance: bool = True
    patience: int = 5
    domain_weight: float = 0.5
    text_weight: float = 0.5
    limit: int | None = None  # per split, for smoke runs
    # Tuned recipe (tune_from=None: heads only, on cached frozen features).
    tune_from: int | None = None
    image_size: int = 224
    colour_constancy: bool = False
    augment: bool = False
    views: int = 3  # augmented views per training image (tuned recipe, with augment)
    tail_lr_scale: float = 0.3  # the pretrained tail moves slower than the fresh heads
    cap: int = 1500  # per (dataset, class) and epoch: majority undersampling
    floor: int = 60  # per (dataset, class) and epoch: minority oversampling
    # Tuned recipe: bf16 autocast for the cached prefix and the tail's training steps
    # ("auto" = where the hardware runs bf16 natively); validation and inference use fp32.
    precision: str = "auto"
    # Exponential moving average of the trained weights (per step), validated and saved
    # instead of the raw weights; None = off. Smooths the last epochs' noise.
    ema: float | None = None


# The shipped default (`medlens train align` with no options; docs/models/lite.md).
DEFAULT_RECIPE = AlignConfig(
    epochs=10,
    lr=1e-3,
    batch_size=128,
    patience=5,
    tune_from=7,
    image_size=224,
    colour_constancy=True,
    augment=True,
    views=2,
    cap=600,
    floor=30,
    ema=0.99,
)


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``auto`` → ``bf16`` where bf16 matrix maths is native (CUDA with bf16, x86 CPUs
    with AVX512-BF16 or AMX), else ``fp32``: emulated bf16 would be slower than fp32.
    On this project's 2-core CPU bf16 makes a prefix pass ~2.5x and a tail training step
    ~3x faster, which is what lets the default recipe train 10 epochs in its budget."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    native = any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return "bf16" if native else "fp32"


def _autocast(precision: str, device: str) -> Any:
    return torch.autocast(
        device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"
    )


@dataclass
class Table:
    """Everything the loop needs, as aligned arrays over all training images.

    ``target`` and ``mask`` hold one column per knowledge pack (keyed by domain id, in
    ``knowledge.domains()`` order): a single-label pack's target is the (N,) finding index
    in that pack (-1 = none: another domain or unlabelled); a multi-label pack's is the
    (N, K) multi-hot over its K findings, with an (N, K) ``mask`` that is 1 where the
    image's dataset labels that finding (0 for other domains' images)."""

    feats: np.ndarray  # (N, F) backbone features
    domain: np.ndarray  # (N,) index into knowledge.domains()
    target: dict[str, np.ndarray]  # domain id -> (N,) class index or (N, K) multi-hot
    mask: dict[str, np.ndarray]  # multi-label domain id -> (N, K) coverage
    text: np.ndarray  # (N,) index into texts, -1 = none
    weight: np.ndarray  # (N,) class-balancing weight
    source: np.ndarray  # (N,) dataset name
    texts: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # (N,) "dataset:finding" for sampling


def _vocab_findings(pack: KnowledgePack, vocab: str) -> list[int]:
    return [i for i, f in enumerate(pack.findings) if vocab in f.labels]


def build_table(
    manifests: list[tuple[Manifest, list[Record]]],
    features: list[np.ndarray] | None,
    balance: bool,
) -> Table:
    ids = domains()
    packs = {d: load_domain(d) for d in ids}
    index = {d: {f.id: i for i, f in enumerate(p.findings)} for d, p in packs.items()}
    multi = [d for d in ids if packs[d].task == "multi_label"]
    # Per pack: single-label → class indices (-1 = none); multi-label → multi-hot rows
    # and their coverage rows. Other domains' images get -1 / zeros.
    target: dict[str, list[Any]] = {d: [] for d in ids}
    mask: dict[str, list[np.ndarray]] = {d: [] for d in multi}
    none = {d: np.zeros(len(packs[d].findings), np.float32) for d in multi}
    rows: dict[str, list[Any]] = {k: [] for k in ("domain", "text", "cls", "src")}
    texts: dict[str, int] = {}
    for manifest, records in manifests:
        own = manifest.domain
        pack = packs[own]
        covered = np.zeros(len(pack.findings), np.float32)
        if own in mask:
            covered[_vocab_findings(pack, manifest.vocab)] = 1.0
        for r in records:
            fids = pack.findings_for(manifest.vocab, r.labels)
            rows["domain"].append(ids.index(own))
            rows["src"].append(manifest.name)
            for d in ids:
                if d in mask:
                    hot = np.zeros(len(packs[d].findings), np.float32)
                    if d == own:
                        for fid in fids:
                            hot[index[d][fid]] = 1.0
                    target[d].append(hot)
                    mask[d].append(covered if d == own and fids else none[d])
                else:
                    target[d].append(index[d][fids[0]] if d == own and fids else -1)
            if own in mask:
                rows["cls"].append(f"{manifest.name}:{'+'.join(sorted(fids)) or '-'}")
            else:
                rows["cls"].append(f"{manifest.name}:{fids[0] if fids else '-'}")
            if r.text:
                rows["text"].append(texts.setdefault(r.text, len(texts)))
            else:
                rows["text"].append(-1)
    cls = rows["cls"]
    if balance:
        # Inverse square-root frequency per (dataset, class), then per dataset: rare
        # cancers and small datasets count without drowning the rest in noise.
        n_cls, n_src = Counter(cls), Counter(rows["src"])
        w = np.array(
            [
                1 / math.sqrt(n_cls[c]) / math.sqrt(n_src[s])
                for c, s in zip(cls, rows["src"], strict=True)
            ]
        )
        w = w / w.mean()
    else:
        w = np.ones(len(cls))
    return Table(
        feats=(
            np.concatenate(features).astype(np.float32)
            if features
            else np.zeros((len(cls), 0), np.float32)
        ),
        domain=np.array(rows["domain"], np.int64),
        target={
            d: _stack(v, len(packs[d].findings)) if d in mask else np.array(v, np.int64)
            for d, v in target.items()
        },
        mask={d: _stack(v, len(packs[d].findings)) for d, v in mask.items()},
        text=np.array(rows["text"], np.int64),
        weight=w.astype(np.float32),
        source=np.array(rows["src"]),
        texts=list(texts),
        classes=list(cls),
    )


def _stack(rows: list[np.ndarray], width: int) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, width), np.float32)


class PromptBank:
    """Backbone text features of every prompt the heads must align to, computed once.

    Groups (each a list of prompt ensembles), per pack in ``knowledge.domains()`` order:
    ``findings/<domain>`` (one ensemble per finding) and, for a multi-label pack,
    ``reference/<domain>`` (its "normal study" prompts); then ``domains`` (one ensemble
    of domain prompts per pack, in domain order: the domain-classification target)."""

    def __init__(self, encoder: Any):
        self.groups: dict[str, list[list[str]]] = {}
        for d in domains():
            pack = load_domain(d)
            self.groups[f"findings/{d}"] = [list(f.prompts) for f in pack.findings]
            if pack.task == "multi_label":
                if not pack.domain.reference_prompts:
                    raise ConfigError(
                        f"knowledge pack {d!r} is multi_label but has no reference_prompts "
                        "(each finding is scored against that reference)"
                    )
                self.groups[f"reference/{d}"] = [list(pack.domain.reference_prompts)]
        self.groups["domains"] = [list(load_domain(d).domain.domain_prompts) for d in domains()]
        flat = [t for groups in self.groups.values() for g in groups for t in g]
        self.feats = encoder.text_features(flat)
        self.slices: dict[str, list[slice]] = {}
        i = 0
        for name, groups in self.groups.items():
            self.slices[name] = []
            for g in groups:
                self.slices[name].append(slice(i, i + len(g)))
                i += len(g)

    def embed(self, text_head: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Ensembled, normalised class embeddings through the (training) text head."""
        z = F.normalize(text_head(self.feats), dim=-1)
        return {
            name: F.normalize(torch.stack([z[s].mean(0) for s in slices]), dim=-1)
            for name, slices in self.slices.items()
        }


def batch_loss(
    enc: Any,
    bank: PromptBank,
    table: Table,
    idx: np.ndarray,
    text_feats: torch.Tensor | None,
    cfg: AlignConfig,
    img: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective on one batch; ``img`` (normalised embeddings of the batch) is given
    when the image tower trains, else computed from the cached features."""
    cls = bank.embed(enc.text_head)
    if img is None:
        img = F.normalize(enc.image_head(torch.from_numpy(table.feats[idx])), dim=-1)
    scale = enc.logit_scale_param.exp().clamp(max=100.0)
    w = torch.from_numpy(table.weight[idx])
    # Parts: one finding loss per pack (named by domain id), then "domain" and "text".
    parts: dict[str, torch.Tensor] = {}

    for d, column in table.target.items():
        if d in table.mask:  # multi-label: masked BCE of each finding vs the reference
            mask = torch.from_numpy(table.mask[d][idx])
            if mask.sum() > 0:
                z = scale * (img @ cls[f"findings/{d}"].T - img @ cls[f"reference/{d}"].T)
                bce = F.binary_cross_entropy_with_logits(
                    z, torch.from_numpy(column[idx]), reduction="none"
                )
                parts[d] = (bce * mask * w[:, None]).sum() / (mask * w[:, None]).sum()
        else:  # single-label: weighted softmax cross-entropy over the pack's findings
            y = torch.from_numpy(column[idx])
            sel = y >= 0
            if sel.any():
                logits = scale * img[sel] @ cls[f"findings/{d}"].T
                ce = F.cross_entropy(logits, y[sel], reduction="none")
                parts[d] = (ce * w[sel]).sum() / w[sel].sum()

    dom = F.cross_entropy(scale * img @ cls["domains"].T, torch.from_numpy(table.domain[idx]))
    parts["domain"] = cfg.domain_weight * dom

    tix = table.text[idx]
    has = tix >= 0
    if text_feats is not None and has.sum() >= 2:
        t = F.normalize(enc.text_head(text_feats[torch.from_numpy(tix[has])]), dim=-1)
        logits = scale * img[torch.from_numpy(has)] @ t.T
        same = torch.from_numpy((tix[has][:, None] == tix[has][None, :]).astype(np.float32))
        target = same / same.sum(1, keepdim=True)
        loss_i = -(target * F.log_softmax(logits, 1)).sum(1).mean()
        loss_t = -(target * F.log_softmax(logits.T, 1)).sum(1).mean()
        parts["text"] = cfg.text_weight * 0.5 * (loss_i + loss_t)

    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def evaluate_heads(enc: Any, bank: PromptBank, table: Table) -> dict[str, float]:
    """Validation scores per dataset, by its pack's task: balanced accuracy (restricted
    to the dataset's findings) for a single-label pack, macro AUROC over the labelled
    findings for a multi-label pack."""
    from medlens.evaluation.metrics import balanced_accuracy, macro_auroc

    with torch.no_grad():
        cls = bank.embed(enc.text_head)
        img = F.normalize(enc.image_head(torch.from_numpy(table.feats)), dim=-1)
        img = img.numpy()
    # The one scoring rule (ranking only: the scale does not change an argmax or an AUROC).
    ids = domains()
    logits = {
        d: scoring.logits_from(
            img,
            cls[f"findings/{d}"].numpy(),
            1.0,
            cls[f"reference/{d}"].numpy() if d in table.mask else None,
        )
        for d in table.target
    }
    scores: dict[str, float] = {}
    for src in np.unique(table.source):
        rows = table.source == src
        d = ids[int(table.domain[rows][0])]  # a dataset belongs to one domain
        if d not in table.mask:
            y = table.target[d][rows]
            keep = y >= 0
            if keep.any():
                cand = np.unique(y[keep])
                pred = cand[np.argmax(logits[d][rows][keep][:, cand], axis=1)]
                scores[str(src)] = balanced_accuracy(y[keep], pred)
        elif table.mask[d][rows].any():
            hot = table.target[d][rows]
            m = table.mask[d][rows].max(0) > 0
            cols = [k for k in np.flatnonzero(m) if 0 < hot[:, k].sum() < rows.sum()]
            if cols:
                scores[str(src)] = macro_auroc(hot[:, cols], logits[d][rows][:, cols])
    return scores


def _load_split(name: str, split: str, limit: int | None) -> tuple[Manifest, list[Record]]:
    m = load_dataset(name)
    recs = [
        r
        for r in m.records
        if r.split == split and (r.path is not None or r.array_index is not None)
    ]
    if limit:
        recs = recs[:limit]
    return m, recs


def _new_encoder(cfg: AlignConfig) -> Any:
    from medlens.models.lite import LiteEncoder

    return LiteEncoder.untrained(
        seed=cfg.seed,
        image_size=cfg.image_size,
        tune_from=cfg.tune_from,
        colour_constancy=cfg.colour_constancy,
    )


def _features(
    enc: Any,
    splits: list[tuple[Manifest, list[Record]]],
    label: str,
    cache_dir: Path,
    progress: Any,
) -> list[np.ndarray]:
    """Per split: frozen-backbone features (heads-only recipe), through the embedding
    cache under ``cache_dir`` (by image content and backbone: evaluation and calibration
    read the same entries)."""
    from medlens import embeddings

    store = embeddings.open_store(cache_dir)
    task = progress.add_task(f"features ({label})", total=sum(len(r) for _, r in splits))
    return [
        embeddings.record_features(
            enc,
            m,
            recs,
            store=store,
            batch_size=64,
            forward_batch=16,
            progress=lambda n: progress.advance(task, n),
        )
        for m, recs in splits
    ]


def _prefix_maps(
    enc: Any,
    splits: list[tuple[Manifest, list[Record]]],
    label: str,
    cache_dir: Path,
    progress: Any,
    view: int,
    seed: int,
    precision: str = "fp32",
) -> np.ndarray:
    """Frozen-prefix outputs (N, C, H, W) as float16 for one view of every record: view 0
    is the inference transform, others a seeded per-domain augmentation. Cached on disk
    per split as one .npy (keyed by backbone, tune_from, view, augmentation and seed):
    training-internal spatial maps, not embeddings, and an augmented view depends on the
    whole split's random stream, so they stay out of ``medlens.embeddings``."""
    from medlens.training.lora import AUGMENT_VERSION, make_augment

    augment = make_augment(seed_size=enc.image_size) if view else None
    desc = f"view{view}-{AUGMENT_VERSION}-seed{seed}" if view else "view0"
    if precision != "fp32":
        desc += f"-{precision}"
    key = f"prefix-{enc.backbone_fingerprint}-from{enc.tune_from}-{desc}"
    task = progress.add_task(
        f"frozen prefix ({label}, view {view})", total=sum(len(r) for _, r in splits)
    )
    out = []
    for i, (m, recs) in enumerate(splits):

        def extract(ims: list[np.ndarray], domain: str = m.domain) -> np.ndarray:
            x = enc.resize_crop(ims)
            if augment is not None:
                hwc = x.permute(0, 2, 3, 1).numpy()
                x = torch.from_numpy(np.stack([augment(im, domain) for im in hwc]))
                x = x.permute(0, 3, 1, 2)
            with _autocast(precision, enc.device_name):
                h = enc.prefix_forward(enc.normalise(x))
            return h.float().cpu().numpy()

        torch.manual_seed(seed * 1000 + view * 100 + i)  # only drawn from on a cache miss
        out.append(
            _cached_maps(
                m,
                recs,
                extract,
                key,
                cache_dir,
                on_batch=lambda n: progress.advance(task, n),
            )
        )
    return np.concatenate(out)


def _cached_maps(
    manifest: Manifest,
    records: list[Record],
    extract: Any,
    key: str,
    cache_dir: Path,
    on_batch: Any = None,
    batch_size: int = 64,
) -> np.ndarray:
    """``extract`` (images → per-image arrays) over ``records``, 64 at a time, as one
    float16 array cached in ``cache_dir`` per (dataset, version, record ids, key) and
    written atomically."""
    h = hashlib.sha256(f"{manifest.name}|{manifest.version}|{key}".encode())
    for r in records:
        h.update(r.id.encode())
        h.update(b"\0")
    path = cache_dir / f"{manifest.name}_{h.hexdigest()[:20]}.npy"
    if path.is_file():
        if on_batch:
            on_batch(len(records))
        return np.load(path)
    out = []
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        out.append(np.asarray(extract([manifest.image(r) for r in batch]), dtype=np.float16))
        if on_batch:
            on_batch(len(batch))
    maps = np.concatenate(out) if out else np.zeros((0, 0), np.float16)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, maps)
    tmp.replace(path)
    return maps


def _map_features(enc: Any, maps: np.ndarray, batch: int = 256) -> np.ndarray:
    """Eval-mode tail features of cached prefix maps (validation)."""
    out = []
    with enc._eval_heads(), torch.inference_mode():
        for s in range(0, len(maps), batch):
            out.append(enc.image_tail(torch.from_numpy(maps[s : s + batch]).float()).numpy())
    return np.concatenate(out) if out else np.zeros((0, enc.image_dim), np.float32)


def _epoch_order(
    train: Table, cfg: AlignConfig, epoch: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices for one epoch: balanced afresh each epoch (so every naevus is seen over
    the run) when the tuned recipe balances; a plain permutation otherwise."""
    if cfg.tune_from is not None and cfg.balance:
        from medlens.training.lora import BalanceRecipe, balance_indices

        keep, _ = balance_indices(
            train.classes, BalanceRecipe(cap=cfg.cap, floor=cfg.floor, seed=cfg.seed + epoch)
        )
        return rng.permutation(keep)
    return rng.permutation(len(train.feats))


def train_align(
    cfg: AlignConfig, out: Path, cache_dir: Path, progress: Any = None
) -> dict[str, Any]:
    """Train the lite encoder; write ``lite_heads.safetensors``, ``config.json`` and
    ``metrics.json`` to ``out``. Returns the final metrics."""
    from contextlib import nullcontext

    from rich.progress import Progress

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    enc = _new_encoder(cfg)
    tuned = cfg.tune_from is not None
    precision = resolve_precision(cfg.precision, enc.device_name) if tuned else "fp32"
    started = time.time()
    ctx = nullcontext(progress) if progress is not None else Progress(disable=True)
    with ctx as progress:
        train_splits = [_load_split(n, "train", cfg.limit) for n in cfg.data]
        val_splits = [_load_split(n, "val", cfg.limit) for n in cfg.data]
        maps: tuple[list[np.ndarray], np.ndarray] | None = None
        if tuned:
            n_views = cfg.views if cfg.augment else 0
            maps = (
                [
                    _prefix_maps(
                        enc, train_splits, "train", cache_dir, progress, v, cfg.seed, precision
                    )
                    for v in range(n_views + 1)
                ],
                _prefix_maps(enc, val_splits, "val", cache_dir, progress, 0, cfg.seed, precision),
            )
            train_feats = val_feats = None
        else:
            train_feats = _features(enc, train_splits, "train", cache_dir, progress)
            val_feats = _features(enc, val_splits, "val", cache_dir, progress)
        # Tuned: loss weights stay 1, the sampler balances; heads-only: class weights.
        train = build_table(train_splits, train_feats, cfg.balance and not tuned)
        val = build_table(val_splits, val_feats, balance=False)
        bank = PromptBank(enc)
        text_feats = enc.text_features(train.texts) if train.texts else None
        prepared = time.time()
        history, best = _fit(enc, cfg, train, val, maps, bank, text_feats, rng, progress, precision)
    enc.load_heads(best[1])
    minutes = (time.time() - started) / 60
    metrics = {
        # Both parts of the wall time: the cache (features / prefix views; ~0 when warm)
        # and the epochs, so a recipe's cost can be stated from a cold or a warm run.
        "minutes_preparing": round((prepared - started) / 60, 2),
        "minutes_training": round((time.time() - prepared) / 60, 2),
        "best_epoch": best[2],
        "val_mean": best[0],
        "val": history[best[2] - 1]["val"],
        "minutes": round(minutes, 2),
        "precision": precision,
        "n_train": len(train.classes),
        "n_val": len(val.classes),
    }
    versions = {m.name: m.version for m, _ in train_splits}
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "recipe": asdict(cfg),
        "data_versions": versions,
        "metrics": metrics,
        "trained_at": time.strftime("%Y-%m-%d"),
        "backbone": enc.backbone_fingerprint,
    }
    enc.save_heads(out / "lite_heads.safetensors", meta)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=list))
    (out / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
    return metrics


def _fit(
    enc: Any,
    cfg: AlignConfig,
    train: Table,
    val: Table,
    maps: tuple[list[np.ndarray], np.ndarray] | None,
    bank: PromptBank,
    text_feats: torch.Tensor | None,
    rng: np.random.Generator,
    progress: Any,
    precision: str = "fp32",
) -> tuple[list[dict[str, Any]], tuple[float, Any, int]]:
    """The epoch loop with early stopping on the mean validation score; returns the
    history and (best score, best state, best epoch)."""
    tuned = maps is not None
    started = time.time()
    head_params = [*enc.image_head.parameters(), *enc.text_head.parameters(), enc.logit_scale_param]
    groups: list[dict[str, Any]] = [{"params": head_params, "lr": cfg.lr}]
    if tuned:
        groups.append(
            {"params": list(enc.image_tail.parameters()), "lr": cfg.lr * cfg.tail_lr_scale}
        )
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    n_epoch = len(_epoch_order(train, cfg, 0, np.random.default_rng(0)))
    steps_per_epoch = math.ceil(n_epoch / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=[g["lr"] for g in groups],
        total_steps=cfg.epochs * steps_per_epoch,
        pct_start=0.1,
    )
    history: list[dict[str, Any]] = []
    best: tuple[float, Any, int] = (-1.0, None, 0)
    ema = _Ema(enc, cfg.ema) if cfg.ema else None
    task = progress.add_task("training", total=cfg.epochs * steps_per_epoch)
    for epoch in range(cfg.epochs):
        enc.train()
        order = _epoch_order(train, cfg, epoch, rng)
        sums: Counter[str] = Counter()
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            img = None
            if tuned:
                with _autocast(precision, enc.device_name):
                    img = _train_embeddings(enc, maps[0], idx, rng)
            loss, parts = batch_loss(enc, bank, train, idx, text_feats, cfg, img=img)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(enc)
            sums.update(parts)
            progress.advance(task)
        enc.eval()
        raw = ema.swap_in(enc) if ema is not None else None
        if tuned:
            val.feats = _map_features(enc, maps[1])
        val_scores = evaluate_heads(enc, bank, val)
        score = float(np.mean(list(val_scores.values()))) if val_scores else 0.0
        history.append(
            {
                "epoch": epoch + 1,
                "loss": {k: v / steps_per_epoch for k, v in sums.items()},
                "val": val_scores,
                "val_mean": score,
                "minutes": round((time.time() - started) / 60, 2),
            }
        )
        if score > best[0]:
            best = (score, enc.heads_state(), epoch + 1)
        if raw is not None:
            enc.load_heads(raw)  # training goes on from the raw weights
        losses = " ".join(f"{k} {v / steps_per_epoch:.3f}" for k, v in sums.items())
        vals = " ".join(f"{k} {v:.3f}" for k, v in val_scores.items())
        progress.console.print(f"epoch {epoch + 1}: {losses} | val {score:.3f} ({vals})")
        if epoch + 1 - best[2] >= cfg.patience:
            break
    return history, best


class _Ema:
    """Exponential moving average of every floating tensor in the encoder's state (the
    trainable tail and heads, and BatchNorm statistics); integer buffers are copied."""

    def __init__(self, enc: Any, decay: float):
        self.decay = decay
        self.steps = 0
        self.state = enc.heads_state()

    @torch.no_grad()
    def update(self, enc: Any) -> None:
        # Warm-up: early on the average must not cling to the untrained start.
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in enc.state_dict().items():
            if v.is_floating_point():
                self.state[k].lerp_(v.detach(), 1.0 - decay)
            else:
                self.state[k].copy_(v)

    def swap_in(self, enc: Any) -> dict[str, torch.Tensor]:
        """Load the averaged weights; returns the raw ones to restore afterwards."""
        raw = enc.heads_state()
        enc.load_heads(self.state)
        return raw


def _train_embeddings(
    enc: Any, views: list[np.ndarray], idx: np.ndarray, rng: np.random.Generator
) -> torch.Tensor:
    """Normalised image embeddings of one training batch: one cached view per image
    (drawn at random), through the trainable tail and image head."""
    pick = rng.integers(len(views), size=len(idx))
    h = np.stack([views[v][i] for v, i in zip(pick, idx, strict=True)])
    feats = enc.image_tail(
        torch.from_numpy(h).float().contiguous(memory_format=torch.channels_last)
    )
    return F.normalize(enc.image_head(feats).float(), dim=-1)

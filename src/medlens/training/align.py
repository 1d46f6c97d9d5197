"""Align the lite encoder's projection heads on the sample datasets' train splits.

The backbones (ImageNet MobileNetV2, all-MiniLM-L6-v2) stay frozen, so their features are
computed once and cached; only the two projection heads and the logit scale train. The
objective is CLIP-style contrastive alignment with label-aware targets:

- images against their finding's prompt ensemble (softmax over the dermatology findings;
  per-finding sigmoid against the "normal study" reference for chest X-ray, masked to the
  findings each dataset actually labels),
- images against their domain's prompts (so ``domain=auto`` works),
- images against their own free text (COVID-19 clinical notes, PAD-UFES-20 symptom
  sentences) with a symmetric InfoNCE whose targets treat identical texts as positives.

Exactly the same prompt ensembles are used at inference (``analysis.zeroshot``).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medlens.datasets import load_dataset
from medlens.datasets.manifest import Manifest, Record
from medlens.knowledge import DOMAINS, KnowledgePack, load_domain
from medlens.training.features import cached_features

DEFAULT_DATA = ("dermamnist", "pad_ufes_20", "dermnet", "covid_chestxray", "pneumoniamnist")


@dataclass
class AlignConfig:
    data: tuple[str, ...] = DEFAULT_DATA
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


@dataclass
class Table:
    """Everything the loop needs, as aligned arrays over all training images."""

    feats: np.ndarray  # (N, F) backbone features
    domain: np.ndarray  # (N,) index into DOMAINS
    derm: np.ndarray  # (N,) finding index in the dermatology pack, -1 = none
    cxr: np.ndarray  # (N, K) multi-hot chest findings
    cxr_mask: np.ndarray  # (N, K) 1 where the dataset labels that finding
    text: np.ndarray  # (N,) index into texts, -1 = none
    weight: np.ndarray  # (N,) class-balancing weight
    source: np.ndarray  # (N,) dataset name
    texts: list[str] = field(default_factory=list)


def _vocab_findings(pack: KnowledgePack, vocab: str) -> list[int]:
    return [i for i, f in enumerate(pack.findings) if vocab in f.labels]


def build_table(
    manifests: list[tuple[Manifest, list[Record]]],
    features: list[np.ndarray],
    balance: bool,
) -> Table:
    derm, cxr = load_domain("dermatology"), load_domain("chest_xray")
    derm_index = {f.id: i for i, f in enumerate(derm.findings)}
    cxr_index = {f.id: i for i, f in enumerate(cxr.findings)}
    rows: dict[str, list[Any]] = {
        k: [] for k in ("domain", "derm", "cxr", "mask", "text", "cls", "src")
    }
    texts: dict[str, int] = {}
    for manifest, records in manifests:
        pack = load_domain(manifest.domain)
        covered = np.zeros(len(cxr.findings), np.float32)
        if manifest.domain == "chest_xray":
            covered[_vocab_findings(cxr, manifest.vocab)] = 1.0
        for r in records:
            fids = [fid for lab in r.labels if (fid := pack.map_label(manifest.vocab, lab))]
            rows["domain"].append(DOMAINS.index(manifest.domain))
            rows["src"].append(manifest.name)
            hot = np.zeros(len(cxr.findings), np.float32)
            if manifest.domain == "dermatology":
                rows["derm"].append(derm_index[fids[0]] if fids else -1)
                rows["mask"].append(np.zeros_like(covered))
                rows["cls"].append(f"{manifest.name}:{fids[0] if fids else '-'}")
            else:
                rows["derm"].append(-1)
                for fid in fids:
                    hot[cxr_index[fid]] = 1.0
                rows["mask"].append(covered if fids else np.zeros_like(covered))
                rows["cls"].append(f"{manifest.name}:{'+'.join(sorted(fids)) or '-'}")
            rows["cxr"].append(hot)
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
        feats=np.concatenate(features).astype(np.float32),
        domain=np.array(rows["domain"], np.int64),
        derm=np.array(rows["derm"], np.int64),
        cxr=np.stack(rows["cxr"]),
        cxr_mask=np.stack(rows["mask"]),
        text=np.array(rows["text"], np.int64),
        weight=w.astype(np.float32),
        source=np.array(rows["src"]),
        texts=list(texts),
    )


class PromptBank:
    """Backbone text features of every prompt the heads must align to, computed once."""

    def __init__(self, encoder: Any):
        derm, cxr = load_domain("dermatology"), load_domain("chest_xray")
        self.groups: dict[str, list[list[str]]] = {
            "derm": [list(f.prompts) for f in derm.findings],
            "cxr": [list(f.prompts) for f in cxr.findings],
            "ref": [list(cxr.domain.reference_prompts)],
            "domain": [list(load_domain(d).domain.domain_prompts) for d in DOMAINS],
        }
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
) -> tuple[torch.Tensor, dict[str, float]]:
    cls = bank.embed(enc.text_head)
    img = F.normalize(enc.image_head(torch.from_numpy(table.feats[idx])), dim=-1)
    scale = enc.logit_scale_param.exp().clamp(max=100.0)
    w = torch.from_numpy(table.weight[idx])
    parts: dict[str, torch.Tensor] = {}

    derm_t = torch.from_numpy(table.derm[idx])
    sel = derm_t >= 0
    if sel.any():
        ce = F.cross_entropy(scale * img[sel] @ cls["derm"].T, derm_t[sel], reduction="none")
        parts["derm"] = (ce * w[sel]).sum() / w[sel].sum()

    mask = torch.from_numpy(table.cxr_mask[idx])
    if mask.sum() > 0:
        z = scale * (img @ cls["cxr"].T - img @ cls["ref"].T)
        bce = F.binary_cross_entropy_with_logits(
            z, torch.from_numpy(table.cxr[idx]), reduction="none"
        )
        parts["cxr"] = (bce * mask * w[:, None]).sum() / (mask * w[:, None]).sum()

    dom = F.cross_entropy(scale * img @ cls["domain"].T, torch.from_numpy(table.domain[idx]))
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
    """Validation scores per dataset: balanced accuracy (restricted to the dataset's
    findings) for dermatology, macro AUROC over labelled findings for chest X-ray."""
    from medlens.evaluation.metrics import balanced_accuracy, macro_auroc

    with torch.no_grad():
        cls = bank.embed(enc.text_head)
        img = F.normalize(enc.image_head(torch.from_numpy(table.feats)), dim=-1)
        derm_logits = (img @ cls["derm"].T).numpy()
        cxr_z = (img @ cls["cxr"].T - img @ cls["ref"].T).numpy()
    scores: dict[str, float] = {}
    for src in np.unique(table.source):
        rows = table.source == src
        if (table.derm[rows] >= 0).any():
            y = table.derm[rows]
            keep = y >= 0
            cand = np.unique(y[keep])
            pred = cand[np.argmax(derm_logits[rows][keep][:, cand], axis=1)]
            scores[str(src)] = balanced_accuracy(y[keep], pred)
        elif table.cxr_mask[rows].any():
            m = table.cxr_mask[rows].max(0) > 0
            cols = [k for k in np.flatnonzero(m) if 0 < table.cxr[rows][:, k].sum() < rows.sum()]
            if cols:
                scores[str(src)] = macro_auroc(table.cxr[rows][:, cols], cxr_z[rows][:, cols])
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


def train_align(
    cfg: AlignConfig, out: Path, cache_dir: Path, progress: Any = None
) -> dict[str, Any]:
    """Train the lite heads; write ``lite_heads.safetensors``, ``config.json`` and
    ``metrics.json`` to ``out``. Returns the final metrics."""
    from medlens.models.lite import LiteEncoder

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    enc = LiteEncoder.untrained(seed=cfg.seed)
    started = time.time()

    def features_for(splits: list[tuple[Manifest, list[Record]]], label: str) -> list[np.ndarray]:
        total = sum(len(r) for _, r in splits)
        task = progress.add_task(f"features ({label})", total=total) if progress else None
        feats = []
        for m, recs in splits:
            feats.append(
                cached_features(
                    m,
                    recs,
                    lambda ims: enc.image_features(ims).numpy(),
                    enc.backbone_fingerprint,
                    cache_dir,
                    on_batch=(lambda n: progress.advance(task, n)) if progress else None,
                )
            )
        return feats

    train_splits = [_load_split(n, "train", cfg.limit) for n in cfg.data]
    val_splits = [_load_split(n, "val", cfg.limit) for n in cfg.data]
    train = build_table(train_splits, features_for(train_splits, "train"), cfg.balance)
    val = build_table(val_splits, features_for(val_splits, "val"), balance=False)
    bank = PromptBank(enc)
    text_feats = enc.text_features(train.texts) if train.texts else None

    params = [*enc.image_head.parameters(), *enc.text_head.parameters(), enc.logit_scale_param]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train.feats) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1
    )
    history: list[dict[str, Any]] = []
    best = (-1.0, None, 0)
    task = progress.add_task("training heads", total=cfg.epochs) if progress else None
    for epoch in range(cfg.epochs):
        enc.image_head.train()
        enc.text_head.train()
        order = rng.permutation(len(train.feats))
        sums: Counter[str] = Counter()
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            loss, parts = batch_loss(enc, bank, train, idx, text_feats, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            sums.update(parts)
        enc.image_head.eval()
        enc.text_head.eval()
        val_scores = evaluate_heads(enc, bank, val)
        score = float(np.mean(list(val_scores.values()))) if val_scores else 0.0
        history.append(
            {
                "epoch": epoch + 1,
                "loss": {k: v / steps_per_epoch for k, v in sums.items()},
                "val": val_scores,
                "val_mean": score,
            }
        )
        if score > best[0]:
            best = (score, {k: v.clone() for k, v in enc.heads_state().items()}, epoch + 1)
        if progress:
            progress.update(task, advance=1, description=f"training heads (val {score:.3f})")
            losses = " ".join(f"{k} {v / steps_per_epoch:.3f}" for k, v in sums.items())
            progress.console.print(f"epoch {epoch + 1}: {losses} | val {score:.3f} {val_scores}")
        if epoch + 1 - best[2] >= cfg.patience:
            break
    enc.load_heads(best[1])
    minutes = (time.time() - started) / 60
    metrics = {
        "best_epoch": best[2],
        "val_mean": best[0],
        "val": history[best[2] - 1]["val"],
        "minutes": round(minutes, 2),
        "n_train": len(train.feats),
        "n_val": len(val.feats),
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

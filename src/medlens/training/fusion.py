"""Fit the context-fusion head of a domain (``medlens train fusion``; issue 15).

Data: every dataset of the pack's ``training_datasets`` whose context the pack codes
(PAD-UFES-20: age, sex, site, Fitzpatrick, diameter, six history items; HAM10000: age,
sex, site; Derm7pt: sex, site, elevation), **validation split only**: the image model
trained on the train splits, so its logits there are over-confident and a head fitted on
them would learn to ignore the context. The test splits stay for ``benchmarks/fusion.py``.

Fit: the head's W (``analysis.fusion``) minimises the cross-entropy of
``softmax(u + W c)`` over all the pack's findings (as ``analyze`` scores them), u the
calibrated image logits, plus ``l2 · ||W||²``; ``l2`` is chosen by group-wise 5-fold
cross-validation *within* the validation data (groups: patient or lesion), so no test
image is ever seen. Only findings some dataset labels get a row; the others keep 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medlens.analysis import fusion as F
from medlens.analysis import scoring
from medlens.analysis.context import ClinicalContext, from_record, vocabulary
from medlens.datasets import load_dataset
from medlens.errors import ConfigError
from medlens.knowledge import KnowledgePack
from medlens.models.card import Calibration

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
N_FOLDS = 5


@dataclass
class FusionData:
    """Per-record arrays of one domain: calibrated image logits, context, label."""

    pack: KnowledgePack
    logits: np.ndarray  # (n, K) calibrated image logits u (over all findings)
    contexts: list[ClinicalContext]
    y: np.ndarray  # (n,) finding index
    dataset: np.ndarray  # (n,) dataset name
    group: np.ndarray  # (n,) patient / lesion id (never split across folds)
    candidates: dict[str, list[int]]  # dataset -> finding indices its labels map to
    records: list[Any]

    def features(self, fields: tuple[str, ...]) -> np.ndarray:
        vocab = vocabulary(self.pack)
        return np.stack([F.encode(c, vocab, fields) for c in self.contexts])

    def subset(self, mask: np.ndarray) -> FusionData:
        idx = np.flatnonzero(mask)
        return FusionData(
            self.pack,
            self.logits[idx],
            [self.contexts[i] for i in idx],
            self.y[idx],
            self.dataset[idx],
            self.group[idx],
            self.candidates,
            [self.records[i] for i in idx],
        )


def calibrated_logits(z: np.ndarray, pack: KnowledgePack, calibration: Calibration) -> np.ndarray:
    """(n, K) ``(z + b) / T``: the logits whose softmax is the calibrated differential."""
    if pack.task != "single_label":
        raise ConfigError("context fusion is for single-label (differential) domains")
    t = calibration.temperature_for(pack.id)
    return (np.atleast_2d(z) + calibration.bias_for(pack.id, pack.finding_ids)) / t


def collect(
    encoder: Any,
    calibration: Calibration,
    pack: KnowledgePack,
    split: str,
    datasets: Sequence[str] | None = None,
    advance_factory: Callable[[str, int], Callable[[int], None] | None] | None = None,
    prompt_cache: Path | None = None,
) -> FusionData:
    """Calibrated image logits, contexts and labels of ``split`` of every dataset the
    pack codes a context for, scored exactly as ``analyze`` scores an image."""
    from medlens.evaluation.protocols import embed_records

    vocab = vocabulary(pack)
    coded = {ds for by_ds in vocab.columns.values() for ds in by_ds}
    coded |= {ds for t in vocab.history for ds in t.coding}
    names = [d for d in (datasets or pack.domain.training_datasets) if d in coded]
    if not names:
        raise ConfigError(f"no dataset with a context coding among {list(datasets or [])}")
    parts: dict[str, list] = {k: [] for k in ("u", "ctx", "y", "ds", "g", "rec")}
    candidates: dict[str, list[int]] = {}
    ids = pack.finding_ids
    for name in names:
        manifest = load_dataset(name)
        recs = [r for r in manifest.records if r.split == split]
        found = [pack.findings_for(manifest.vocab_of(r), r.labels) for r in recs]
        keep = [i for i, f in enumerate(found) if len(f) == 1]
        recs, found = [recs[i] for i in keep], [found[i][0] for i in keep]
        if not recs:
            continue
        flips = pack.domain.test_time_flips
        adv = (
            advance_factory(f"{name} ({split})", len(recs) * (1 + len(flips)))
            if (advance_factory)
            else None
        )
        emb = embed_records(encoder, manifest, recs, adv, flips)
        z = scoring.finding_logits(encoder, pack, emb, prompt_cache)
        parts["u"].append(calibrated_logits(z, pack, calibration))
        parts["ctx"] += [from_record(r.meta, name, vocab) for r in recs]
        parts["y"].append(np.array([ids.index(f) for f in found]))
        parts["ds"].append(np.array([name] * len(recs)))
        parts["g"].append(np.array([f"{name}:{r.group or r.id}" for r in recs]))
        parts["rec"] += recs
        candidates[name] = [
            ids.index(f) for f in pack.candidates(manifest.vocab, manifest.label_set())
        ]
    return FusionData(
        pack,
        np.concatenate(parts["u"]),
        parts["ctx"],
        np.concatenate(parts["y"]),
        np.concatenate(parts["ds"]),
        np.concatenate(parts["g"]),
        candidates,
        parts["rec"],
    )


def fit_weight(
    u: np.ndarray, c: np.ndarray, y: np.ndarray, rows: Sequence[int], l2: float
) -> np.ndarray:
    """(K, C) W minimising mean CE of softmax(u + W c) + l2·||W||², W zero outside
    ``rows`` (the findings some record is labelled with). Convex; L-BFGS converges."""
    torch.manual_seed(0)
    rows = list(rows)
    ut = torch.as_tensor(u, dtype=torch.float64)
    ct = torch.as_tensor(c, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.long)
    w = torch.zeros(len(rows), c.shape[1], dtype=torch.float64, requires_grad=True)
    idx = torch.as_tensor(rows)
    opt = torch.optim.LBFGS(
        [w], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def loss_fn() -> torch.Tensor:
        opt.zero_grad()
        z = ut.clone()
        z[:, idx] = z[:, idx] + ct @ w.T
        loss = torch.nn.functional.cross_entropy(z, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(loss_fn)
    out = np.zeros((u.shape[1], c.shape[1]))
    out[rows] = w.detach().numpy()
    return out


def group_folds(groups: np.ndarray, n_folds: int = N_FOLDS) -> np.ndarray:
    """Fold 0..n-1 per record, every group in one fold (by a stable hash of its id)."""
    import hashlib

    uniq = sorted(set(groups.tolist()))
    fold = {g: int(hashlib.sha256(g.encode()).hexdigest(), 16) % n_folds for g in uniq}
    return np.array([fold[g] for g in groups])


def cross_validated_nll(data: FusionData, fields: tuple[str, ...], l2: float) -> float:
    """Group-wise out-of-fold mean negative log-likelihood of the fused differential."""
    c = data.features(fields)
    folds = group_folds(data.group)
    rows = sorted(set(data.y.tolist()))
    nll = []
    for k in range(N_FOLDS):
        tr, te = folds != k, folds == k
        w = fit_weight(data.logits[tr], c[tr], data.y[tr], rows, l2)
        z = data.logits[te] + c[te] @ w.T
        logp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        nll.append(-logp[np.arange(te.sum()), data.y[te]])
    return float(np.concatenate(nll).mean())


VIEW_WEIGHT_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def view_pairs(data: FusionData) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (clinical, dermoscopic) of the cases that have both views (Derm7pt:
    ``meta["view"]`` is ``clinic`` or ``derm``, the record group is the case)."""
    by_case: dict[str, dict[str, int]] = {}
    for i, r in enumerate(data.records):
        view = (r.meta or {}).get("view")
        if view in ("clinic", "derm"):
            by_case.setdefault(str(data.group[i]), {})[view] = i
    both = [v for v in by_case.values() if len(v) == 2]
    return np.array([v["clinic"] for v in both], int), np.array([v["derm"] for v in both], int)


def fit_dermoscopy_weight(
    data: FusionData, grid: Sequence[float] = VIEW_WEIGHT_GRID
) -> tuple[float, dict[str, float]]:
    """The weight a of the dermoscopic view in a pair, (1 - a)·z_clinical + a·z_dermoscopy,
    by the pairs' NLL over their dataset's findings; (0.5, {}) when ``data`` has no pairs
    (then the equal mean, unmeasured)."""
    ci, di = view_pairs(data)
    if len(ci) == 0:
        return F.UNMEASURED_DERMOSCOPY_WEIGHT, {}
    name = str(data.dataset[ci[0]])
    cand = np.array(data.candidates[name])
    y = np.array([int(np.flatnonzero(cand == v)[0]) for v in data.y[di]])
    nll = {}
    for a in grid:
        z = ((1 - a) * data.logits[ci] + a * data.logits[di])[:, cand]
        logp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        nll[str(a)] = round(float(-logp[np.arange(len(y)), y].mean()), 5)
    best = min(grid, key=lambda a: nll[str(a)])
    return float(best), nll


def fit_head(
    data: FusionData,
    fingerprint: str,
    fields: tuple[str, ...] = F.FIELDS,
    l2_grid: Sequence[float] = L2_GRID,
) -> F.FusionHead:
    """The head of ``data``'s pack: l2 by grouped cross-validation on ``data``, then W
    refitted on all of it."""
    vocab = vocabulary(data.pack)
    scores = {l2: cross_validated_nll(data, fields, l2) for l2 in l2_grid}
    l2 = min(scores, key=scores.get)
    rows = sorted(set(data.y.tolist()))
    w = fit_weight(data.logits, data.features(fields), data.y, rows, l2)
    findings = tuple(data.pack.finding_ids[i] for i in rows)
    u0 = data.logits
    base = -(u0 - np.logaddexp.reduce(u0, axis=1, keepdims=True))[np.arange(len(data.y)), data.y]
    info = {
        "l2": l2,
        "cv_nll": {str(k): round(v, 5) for k, v in scores.items()},
        "image_only_nll": round(float(base.mean()), 5),
        "fitted_on": {str(d): int((data.dataset == d).sum()) for d in np.unique(data.dataset)},
        "split": "val",
    }
    a, view_nll = fit_dermoscopy_weight(data)
    info["dermoscopy_weight_nll"] = view_nll
    info["view_pairs"] = len(view_pairs(data)[0])
    return F.FusionHead(
        fingerprint=fingerprint,
        domain=data.pack.id,
        fields=tuple(fields),
        features=tuple(F.feature_names(vocab, tuple(fields))),
        findings=findings,
        weight=w[rows],
        info=info,
        dermoscopy_weight=a,
    )

"""Metric functions over arrays (scikit-learn style): labels, predictions, scores.

Every function takes plain arrays so tests can call it with hand-made inputs, and every
protocol computes its numbers through these.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(pred)))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y`` (ISIC 2018's metric)."""
    y, pred = np.asarray(y), np.asarray(pred)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def per_class_sens_spec(
    y: np.ndarray, pred: np.ndarray, classes: np.ndarray
) -> dict[int, dict[str, float]]:
    out = {}
    for c in classes:
        pos, neg = y == c, y != c
        out[int(c)] = {
            "sensitivity": float(np.mean(pred[pos] == c)) if pos.any() else float("nan"),
            "specificity": float(np.mean(pred[neg] != c)) if neg.any() else float("nan"),
            "support": int(pos.sum()),
        }
    return out


def auroc_columns(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of every column at once (Mann–Whitney U on average ranks, which
    equals the trapezoidal ROC area with ties); NaN where a column lacks a class.

    Vectorised so bootstrap CIs over many classes stay cheap.
    """
    y = np.asarray(y_true).astype(bool)
    ranks = rankdata(np.asarray(scores, dtype=float), axis=0)
    pos = y.sum(0).astype(float)
    neg = len(y) - pos
    u = (ranks * y).sum(0) - pos * (pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((pos > 0) & (neg > 0), u / (pos * neg), np.nan)


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro one-vs-rest AUROC.

    ``y_true``: (N,) class indices into the columns of ``scores`` (N, K), or (N, K)
    multi-hot. Columns without both positives and negatives are skipped.
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    if y_true.ndim == 1:
        y_true = np.eye(scores.shape[1], dtype=np.int8)[y_true]
    aucs = auroc_columns(y_true, scores)
    aucs = aucs[np.isfinite(aucs)]
    return float(aucs.mean()) if len(aucs) else float("nan")


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of a score for 0/1 labels; NaN when only one class is present."""
    y = np.asarray(y).reshape(-1, 1)
    return float(auroc_columns(y, np.asarray(score, dtype=float).reshape(-1, 1))[0])


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence (equal-width bins)."""
    probs, y = np.asarray(probs), np.asarray(y)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    onehot = np.eye(probs.shape[1])[np.asarray(y)]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(probs)[np.arange(len(y)), np.asarray(y)], 1e-12, 1.0)
    return float(-np.mean(np.log(p)))


def binary_probs(p: np.ndarray) -> np.ndarray:
    """(N,) positive-class probabilities as (N, 2) two-class rows, for ``ece``/``brier``."""
    p = np.asarray(p, dtype=float)
    return np.stack([1 - p, p], axis=1)


def top_k_accuracy(y: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` highest scores."""
    top = np.argsort(-np.asarray(scores), axis=1)[:, :k]
    return float(np.mean((top == np.asarray(y)[:, None]).any(axis=1)))


def binary_report(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity, precision and F1 of 0/1 predictions."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp, fn = int(np.sum(y & pred)), int(np.sum(y & ~pred))
    tn, fp = int(np.sum(~y & ~pred)), int(np.sum(~y & pred))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"sensitivity": sens, "specificity": spec, "precision": prec, "f1": f1}


def sensitivity(y: np.ndarray, pred: np.ndarray) -> float:
    return binary_report(y, pred)["sensitivity"]


def specificity(y: np.ndarray, pred: np.ndarray) -> float:
    return binary_report(y, pred)["specificity"]


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    return binary_report(y, pred)["f1"]


def retrieval_ranks(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of the best-ranked relevant candidate for every query.

    ``similarity`` (Q, C): higher is closer. ``relevant`` (Q, C) bool: which candidates
    count as a hit. Ties are counted pessimistically (a tie ranks behind the hit).
    """
    sim, rel = np.asarray(similarity, dtype=float), np.asarray(relevant, dtype=bool)
    best = np.where(rel, sim, -np.inf).max(axis=1)
    return (sim >= best[:, None]).sum(axis=1) - (rel & (sim >= best[:, None])).sum(axis=1) + 1


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(np.asarray(ranks) <= k))


def median_rank(ranks: np.ndarray) -> float:
    return float(np.median(ranks))


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (the data of a
    reliability diagram; ``ece`` is their count-weighted gap)."""
    probs, y = np.asarray(probs), np.asarray(y)
    conf, correct = probs.max(1), (probs.argmax(1) == y).astype(float)
    rows = []
    for lo, hi in itertools.pairwise(np.linspace(0, 1, n_bins + 1)):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            rows.append(
                {
                    "lo": float(lo),
                    "hi": float(hi),
                    "confidence": float(conf[m].mean()),
                    "accuracy": float(correct[m].mean()),
                    "count": int(m.sum()),
                }
            )
    return rows


def bootstrap_ci(
    fn: Callable[..., float],
    *arrays: np.ndarray,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``fn(*arrays)`` resampling rows with replacement.

    With ``groups`` (e.g. patient ids) whole groups are resampled (cluster bootstrap):
    images of one patient are not independent, and row resampling would understate
    the interval.
    """
    rng = np.random.default_rng(seed)
    m = len(arrays[0])
    if groups is not None:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    vals = []
    for _ in range(n):
        if groups is None:
            idx = rng.integers(0, m, m)
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        try:
            v = fn(*(a[idx] for a in arrays))
        except ValueError:  # a resample without both classes for AUROC
            continue
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))

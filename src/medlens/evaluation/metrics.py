"""Metric functions over arrays (scikit-learn style): labels, predictions, scores.

Every function takes plain arrays so tests can call it with hand-made inputs, and every
protocol computes its numbers through these.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from sklearn import metrics as skm


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


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro one-vs-rest AUROC.

    ``y_true``: (N,) class indices into the columns of ``scores`` (N, K), or (N, K)
    multi-hot. Columns without both positives and negatives are skipped.
    """
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    if y_true.ndim == 1:
        y_true = np.eye(scores.shape[1], dtype=np.int8)[y_true]
    aucs = [
        skm.roc_auc_score(y_true[:, k], scores[:, k])
        for k in range(scores.shape[1])
        if 0 < y_true[:, k].sum() < len(y_true)
    ]
    return float(np.mean(aucs)) if aucs else float("nan")


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    return float(skm.roc_auc_score(np.asarray(y), np.asarray(score)))


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


def bootstrap_ci(
    fn: Callable[..., float], *arrays: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``fn(*arrays)`` resampling rows with replacement."""
    rng = np.random.default_rng(seed)
    m = len(arrays[0])
    vals = []
    for _ in range(n):
        idx = rng.integers(0, m, m)
        try:
            v = fn(*(a[idx] for a in arrays))
        except ValueError:  # a resample without both classes for AUROC
            continue
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))

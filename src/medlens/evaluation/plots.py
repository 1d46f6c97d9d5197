"""Small PNG plots of a protocol's results: confusion matrix, ROC curves, reliability
diagram and Recall@K curves. Each function takes arrays and a path, and writes one file.

Files stay small (low dpi, few colours) because the full-run plots are committed under
docs/plots/.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from medlens.evaluation import metrics as M

DPI = 80


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _short(name: str, n: int = 18) -> str:
    name = name.replace("_", " ")
    return name if len(name) <= n else name[: n - 1] + "…"


def confusion_matrix(
    y: np.ndarray, pred: np.ndarray, classes: Sequence[str], path: Path, title: str
) -> Path:
    """Row-normalised confusion matrix (rows: truth), counts in the cells when few classes."""
    k = len(classes)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (np.asarray(y), np.asarray(pred)), 1)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 4.2 if k <= 8 else min(10.0, 2.5 + 0.16 * k)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    labels = [_short(c) for c in classes]
    fs = 7 if k <= 8 else 5
    ax.set_xticks(range(k), labels, rotation=90, fontsize=fs)
    ax.set_yticks(range(k), labels, fontsize=fs)
    if k <= 8:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if rows[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("truth", fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    title: str,
    points: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """ROC curves, one per ``name -> (y 0/1, score)``; ``points`` marks operating points as
    ``label -> (sensitivity, specificity)``."""
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    for name, (y, s) in curves.items():
        y = np.asarray(y)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, lw=1.2, label=f"{_short(name)} {M.binary_auroc(y, s):.3f}")
    for label, (sens, spec) in (points or {}).items():
        ax.plot([1 - spec], [sens], "o", color="crimson", ms=5, label=label)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
    ax.set_xlabel("1 − specificity", fontsize=8)
    ax.set_ylabel("sensitivity", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def reliability_diagram(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str, n_bins: int = 15
) -> Path:
    """Accuracy against confidence per bin, one line per ``label -> (probs (N,K), y)``."""
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
    for label, (probs, y) in series.items():
        bins = M.reliability_bins(probs, y, n_bins)
        ece = M.ece(probs, y, n_bins)
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            "o-",
            ms=3,
            lw=1,
            label=f"{label} (ECE {ece:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    return _save(fig, path)


def recall_at_k_curves(ranks: Mapping[str, tuple[np.ndarray, int]], path: Path, title: str) -> Path:
    """Recall@K for K = 1..n_candidates, one line per ``label -> (ranks, n_candidates)``,
    with the chance line K / n."""
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    for label, (r, n) in ranks.items():
        ks = np.arange(1, n + 1)
        ax.plot(ks, [M.recall_at_k(r, k) for k in ks], lw=1.2, label=label)
        ax.plot(ks, ks / n, ls=":", lw=0.8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("K", fontsize=8)
    ax.set_ylabel("Recall@K", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_title(title + " (dotted: chance)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    return _save(fig, path)

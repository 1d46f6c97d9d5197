"""Metric functions over arrays: labels, predictions, scores.

Every function takes plain arrays so tests can call it with hand-made inputs, and every
protocol computes its numbers through these. Whatever scikit-learn defines is computed
by scikit-learn; these wrappers only fix the conventions the protocols rely on (NaN
where a metric is undefined, e.g. an AUROC without both classes, and macro averages over
the classes that are defined). What scikit-learn lacks stays here: ECE and its
reliability bins, retrieval ranks, and the (patient-)grouped percentile bootstrap.

scikit-learn is imported inside the functions: importing ``sklearn.metrics`` (and the
scipy it pulls in) takes seconds, and this module is imported by the command-line modules.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence scikit-learn's warnings about cases these functions define on purpose
    (predicted classes absent from ``y``, a ``k`` covering every class, probabilities
    that do not sum to one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # UndefinedMetricWarning is one
        yield


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    if not len(y):  # undefined; scikit-learn refuses empty input
        return float("nan")
    return float(accuracy_score(y, pred))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y`` (ISIC 2018's metric)."""
    from sklearn.metrics import balanced_accuracy_score

    if not len(y):
        return float("nan")
    with _quiet():
        return float(balanced_accuracy_score(y, pred))


def per_class_sens_spec(
    y: np.ndarray, pred: np.ndarray, classes: np.ndarray
) -> dict[int, dict[str, float]]:
    """Sensitivity (recall), specificity and support of every class in ``classes``, one
    vs rest over all rows (rows of other classes count as negatives); NaN when a class
    has no positives (sensitivity) or no negatives (specificity)."""
    from sklearn.metrics import multilabel_confusion_matrix

    if not len(y):
        cm = np.zeros((len(classes), 2, 2), dtype=int)
    else:
        cm = multilabel_confusion_matrix(y, pred, labels=np.asarray(classes))
    out = {}
    for c, ((tn, fp), (fn, tp)) in zip(classes, cm, strict=True):
        out[int(c)] = {
            "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
            "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
            "support": int(tp + fn),
        }
    return out


def auroc_columns(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC (``roc_auc_score``) of every column of ``scores`` (N, K) against
    the same column of the multi-hot ``y_true`` (N, K); NaN where a column lacks
    positives or negatives, or has NaN scores."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=float)
    ok = y.any(0) & ~y.all(0) & ~np.isnan(s).any(0)
    out = np.full(y.shape[1], np.nan)
    if ok.sum() == 1:
        out[ok] = roc_auc_score(y[:, ok].ravel(), s[:, ok].ravel())
    elif ok.any():  # one multi-label call: validates once, then scores each column
        out[ok] = roc_auc_score(y[:, ok], s[:, ok], average=None)
    return out


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro one-vs-rest AUROC.

    ``y_true``: (N,) class indices into the columns of ``scores`` (N, K), or (N, K)
    multi-hot. Columns without both positives and negatives are skipped (scikit-learn's
    ``multi_class="ovr"`` would refuse the whole input instead).
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


def _confidence_bins(
    probs: np.ndarray, y: np.ndarray, n_bins: int
) -> Iterator[tuple[float, float, np.ndarray, np.ndarray, np.ndarray]]:
    """Top-1 confidence and correctness, split into equal-width (lo, hi] bins; yields
    ``(lo, hi, in_bin, conf, correct)`` for the non-empty bins."""
    probs, y = np.asarray(probs), np.asarray(y)
    conf, correct = probs.max(1), (probs.argmax(1) == y).astype(float)
    for lo, hi in itertools.pairwise(np.linspace(0, 1, n_bins + 1)):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            yield float(lo), float(hi), m, conf, correct


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence (equal-width bins).

    scikit-learn has no multi-class ECE (``calibration_curve`` is binary, with
    [lo, hi) bins), so it is computed here.
    """
    total = 0.0
    for _, _, m, conf, correct in _confidence_bins(probs, y, n_bins):
        total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (the data of a
    reliability diagram; ``ece`` is their count-weighted gap)."""
    return [
        {
            "lo": lo,
            "hi": hi,
            "confidence": float(conf[m].mean()),
            "accuracy": float(correct[m].mean()),
            "count": int(m.sum()),
        }
        for lo, hi, m, conf, correct in _confidence_bins(probs, y, n_bins)
    ]


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of the summed squared error against the
    one-hot label (not halved for two classes); NaN when ``probs`` has NaNs."""
    from sklearn.metrics import brier_score_loss

    probs = np.asarray(probs, dtype=float)
    if not len(probs) or np.isnan(probs).any():
        return float("nan")
    labels = np.arange(probs.shape[1])
    with _quiet():
        return float(brier_score_loss(y, probs, labels=labels, scale_by_half=False))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (``log_loss``), its probability
    floored at 1e-12 (scikit-learn's own floor is machine epsilon); NaN when ``probs``
    has NaNs."""
    from sklearn.metrics import log_loss

    probs = np.clip(np.asarray(probs, dtype=float), 1e-12, 1.0)
    if not len(probs) or np.isnan(probs).any():
        return float("nan")
    with _quiet():
        return float(log_loss(y, probs, labels=np.arange(probs.shape[1])))


def binary_probs(p: np.ndarray) -> np.ndarray:
    """(N,) positive-class probabilities as (N, 2) two-class rows, for ``ece``/``brier``."""
    p = np.asarray(p, dtype=float)
    return np.stack([1 - p, p], axis=1)


def top_k_accuracy(y: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` highest scores (exact ties at
    the k-th place go to the higher column, as in scikit-learn)."""
    from sklearn.metrics import top_k_accuracy_score

    scores = np.asarray(scores)
    if not len(scores):
        return float("nan")
    if scores.shape[1] == 2:  # scikit-learn reads two columns as a binary problem
        return accuracy(y, (scores[:, 1] >= scores[:, 0]).astype(int)) if k < 2 else 1.0
    with _quiet():
        return float(top_k_accuracy_score(y, scores, k=k, labels=np.arange(scores.shape[1])))


def binary_report(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity, precision and F1 of 0/1 predictions (NaN where the
    denominator is zero): the positive and negative class's recall, the positive
    class's precision and F1."""
    from sklearn.metrics import precision_recall_fscore_support

    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    if not len(y):
        return dict.fromkeys(("sensitivity", "specificity", "precision", "f1"), float("nan"))
    prec, rec, f1_, _ = precision_recall_fscore_support(
        y, pred, labels=[False, True], average=None, zero_division=np.nan
    )
    return {
        "sensitivity": float(rec[1]),
        "specificity": float(rec[0]),
        "precision": float(prec[1]),
        "f1": float(f1_[1]),
    }


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
    """Share of queries whose first hit ranks in the top ``k`` (of ``retrieval_ranks``)."""
    return float(np.mean(np.asarray(ranks) <= k))


def median_rank(ranks: np.ndarray) -> float:
    return float(np.median(ranks))


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
    the interval. Resamples where ``fn`` is undefined (NaN, or a ValueError) are
    dropped; (NaN, NaN) when none is defined. Neither scikit-learn nor
    ``scipy.stats.bootstrap`` resamples by group.
    """
    rng = np.random.default_rng(seed)
    m = len(arrays[0])
    if groups is not None:
        _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
        # row indices of every group, in row order
        members = np.split(np.argsort(inverse.ravel(), kind="stable"), np.cumsum(counts)[:-1])
    vals = []
    for _ in range(n):
        if groups is None:
            idx = rng.integers(0, m, m)
        else:
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        try:
            v = fn(*(a[idx] for a in arrays))
        except ValueError:  # e.g. scikit-learn refusing a degenerate resample
            continue
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))

"""Temperature scaling: one scalar per domain that makes probabilities honest.

Zero-shot similarities times the encoder's logit scale are rarely calibrated: a softmax
over them is usually over- or under-confident. Dividing the logits by a temperature
``T`` fitted on held-out data (minimising the negative log-likelihood) fixes the scale
without changing the ranking of findings for any one image (Guo et al. 2017). The
pipeline applies ``T`` from the model's calibration; evaluation fits it on a dataset's
validation split with the same functions, so both use one definition.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

T_BOUNDS = (0.01, 100.0)  # a wide, sane search range for the temperature


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def softmax_nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of class indices ``y`` under softmax(logits / T)."""
    logits = np.asarray(logits, dtype=np.float64) / float(temperature)
    y = np.asarray(y, dtype=int)
    return float(-_log_softmax(logits)[np.arange(len(y)), y].mean())


def sigmoid_nll(
    logits: np.ndarray,
    targets: np.ndarray,
    temperature: float = 1.0,
    mask: np.ndarray | None = None,
) -> float:
    """Mean binary cross-entropy of 0/1 ``targets`` under sigmoid(logits / T), over the
    entries where ``mask`` is true (all when None)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    t = np.asarray(targets, dtype=np.float64)
    m = np.ones_like(t, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    ll = t * _log_sigmoid(z) + (1 - t) * _log_sigmoid(-z)
    return float(-ll[m].mean())


def _fit(objective, bounds: tuple[float, float]) -> float:
    # Search log T: the NLL is smooth and unimodal in it for practical logits.
    res = minimize_scalar(
        lambda log_t: objective(float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(res.x))


def fit_temperature(
    logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = T_BOUNDS
) -> float:
    """Temperature minimising the softmax NLL of single-label ``logits`` (N, K) for class
    indices ``y`` (N,). Returns 1.0 when there is nothing to fit on."""
    logits, y = np.asarray(logits), np.asarray(y)
    if len(y) == 0:
        return 1.0
    return _fit(lambda t: softmax_nll(logits, y, t), bounds)


def fit_temperature_multilabel(
    logits: np.ndarray,
    targets: np.ndarray,
    mask: np.ndarray | None = None,
    bounds: tuple[float, float] = T_BOUNDS,
) -> float:
    """Temperature minimising the per-finding binary NLL of multi-label ``logits`` (N, K)
    (each finding's logit relative to the domain's reference, as ``scoring.probabilities``
    takes it) for 0/1 ``targets`` (N, K). ``mask`` (N, K) marks the entries that carry a
    label; unknown entries are ignored.

    Fitted on the raw sigmoids, before ``scoring.consistent`` caps a finding that
    declares ``excludes`` ("no finding"): the cap never moves the other findings, and one
    temperature per domain should not be bent by a rule applied after it."""
    targets = np.asarray(targets)
    if targets.size == 0 or (mask is not None and not np.asarray(mask).any()):
        return 1.0
    return _fit(lambda t: sigmoid_nll(logits, targets, t, mask), bounds)


def fit_temperature_and_bias(
    logits: np.ndarray, y: np.ndarray, l2: float = 1e-3
) -> tuple[float, np.ndarray]:
    """Bias-corrected temperature scaling (Alexandari et al. 2020): a temperature and a
    per-finding logit offset minimising the softmax NLL of single-label ``logits`` (N, K)
    for class indices ``y``, with an L2 penalty on the offsets. The offsets undo the class
    priors that balanced training imposes (rare findings are over-called otherwise) and
    keep probabilities calibrated; rankings within one finding are unchanged, so
    thresholds are chosen after it. Returns (1.0, zeros) when there is nothing to fit."""
    from scipy.optimize import minimize

    z = np.asarray(logits, np.float64)
    y = np.asarray(y, dtype=int)
    n, k = z.shape
    if n == 0:
        return 1.0, np.zeros(k)
    onehot = np.zeros_like(z)
    onehot[np.arange(n), y] = 1.0

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        t, b = float(np.exp(params[0])), params[1:]
        u = (z + b) / t
        lp = _log_softmax(u)
        g = (np.exp(lp) - onehot) / n  # d NLL / d u
        nll = -lp[np.arange(n), y].mean() + l2 * float(b @ b)
        grad_b = g.sum(0) / t + 2 * l2 * b
        grad_log_t = float(-(g * u).sum())
        return nll, np.concatenate([[grad_log_t], grad_b])

    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize(
        objective,
        np.zeros(k + 1),
        jac=True,
        method="L-BFGS-B",
        bounds=[(lo, hi)] + [(None, None)] * k,
    )
    return float(np.exp(res.x[0])), res.x[1:]

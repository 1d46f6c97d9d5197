"""Metric functions against values worked out by hand or by scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medlens.evaluation import metrics as M


def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 4, 300))
    assert M.balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))


def test_macro_auroc_multiclass_and_multilabel_agree():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    scores = rng.random((200, 3)) + np.eye(3)[y] * 0.5
    expected = np.mean([roc_auc_score(y == k, scores[:, k]) for k in range(3)])
    assert M.macro_auroc(y, scores) == pytest.approx(expected)
    assert M.macro_auroc(np.eye(3)[y], scores) == pytest.approx(expected)


def test_ece_zero_for_perfectly_calibrated_and_positive_for_overconfident():
    y = np.array([0, 1] * 50)
    probs = np.tile([0.5, 0.5], (100, 1))
    assert M.ece(probs, y) == pytest.approx(0.0, abs=1e-9)
    over = np.tile([0.99, 0.01], (100, 1))  # says class 0 at 99 %, right half the time
    assert M.ece(over, y) == pytest.approx(0.49, abs=1e-6)


def test_brier_and_nll_of_a_perfect_prediction():
    y = np.array([0, 2, 1])
    probs = np.eye(3)[y]
    assert M.brier(probs, y) == 0.0
    assert M.nll(probs, y) == pytest.approx(0.0, abs=1e-9)


def test_bootstrap_ci_brackets_the_estimate():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.8, y, 1 - y)
    lo, hi = M.bootstrap_ci(M.accuracy, y, pred, n=300)
    assert lo < M.accuracy(y, pred) < hi
    assert hi - lo < 0.15


def test_per_class_sensitivity_specificity():
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    out = M.per_class_sens_spec(y, pred, np.arange(3))
    assert out[0] == {"sensitivity": 0.5, "specificity": pytest.approx(2 / 3), "support": 2}
    assert out[2]["sensitivity"] == 0.0

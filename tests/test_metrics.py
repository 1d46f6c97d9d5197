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


def test_auroc_columns_match_sklearn_with_ties_and_skip_single_class_columns():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (300, 3))
    y[:, 2] = 1  # no negatives: undefined
    scores = np.round(rng.random((300, 3)) + 0.3 * y, 1)  # rounding makes ties
    aucs = M.auroc_columns(y, scores)
    for k in range(2):
        assert aucs[k] == pytest.approx(roc_auc_score(y[:, k], scores[:, k]))
    assert np.isnan(aucs[2])
    assert M.binary_auroc(y[:, 0], scores[:, 0]) == pytest.approx(aucs[0])
    assert np.isnan(M.binary_auroc(np.ones(5), np.arange(5)))


def test_top_k_accuracy_and_binary_report():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    y = np.array([2, 0, 0])
    assert M.top_k_accuracy(y, scores, 1) == pytest.approx(1 / 3)
    assert M.top_k_accuracy(y, scores, 2) == pytest.approx(2 / 3)
    assert M.top_k_accuracy(y, scores, 3) == 1.0
    rep = M.binary_report(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert rep["sensitivity"] == pytest.approx(2 / 3)
    assert rep["specificity"] == pytest.approx(1 / 2)
    assert rep["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_retrieval_ranks_recall_and_ties_count_against_the_hit():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.8], [0.3, 0.3, 0.3]])
    rel = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    ranks = M.retrieval_ranks(sim, rel)
    # query 0: hit is best (rank 1); query 1: best hit 0.2 is behind 0.8 (rank 2);
    # query 2: three-way tie, counted pessimistically (rank 3).
    assert ranks.tolist() == [1, 2, 3]
    assert M.recall_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert M.recall_at_k(ranks, 2) == pytest.approx(2 / 3)
    assert M.median_rank(ranks) == 2


def test_grouped_bootstrap_is_wider_for_clustered_data():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(40), 10)  # 40 patients, 10 images each, all alike
    correct = np.repeat(rng.random(40) < 0.6, 10).astype(float)
    mean = lambda a: float(a.mean())  # noqa: E731
    lo_r, hi_r = M.bootstrap_ci(mean, correct, n=400)
    lo_g, hi_g = M.bootstrap_ci(mean, correct, n=400, groups=groups)
    assert (hi_g - lo_g) > 1.8 * (hi_r - lo_r)


def test_reliability_bins_weight_to_ece():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(4), 500)
    y = rng.integers(0, 4, 500)
    bins = M.reliability_bins(probs, y, 15)
    assert sum(b["count"] for b in bins) == 500
    gap = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / 500
    assert gap == pytest.approx(M.ece(probs, y, 15))

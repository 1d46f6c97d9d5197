"""Metric functions: every thin wrapper against scikit-learn called directly on
realistic arrays; ECE, reliability bins, retrieval ranks and the bootstrap (which
scikit-learn lacks) against values worked out by hand."""

import numpy as np
import pytest
from sklearn import metrics as skm

from medlens.evaluation import metrics as M

# ISIC-2018-like class frequencies: one dominant class, two rare ones.
PRIORS = np.array([0.11, 0.05, 0.03, 0.67, 0.11, 0.01, 0.02])


@pytest.fixture(scope="module")
def multiclass():
    """(y, probs, pred) of a 7-class softmax classifier that is right more often than not."""
    rng = np.random.default_rng(0)
    n, k = 800, len(PRIORS)
    y = rng.choice(k, n, p=PRIORS)
    logits = rng.normal(0, 1, (n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs, probs.argmax(1)


@pytest.fixture(scope="module")
def binary():
    """(y, p, pred) of one finding: 15 % positives, a sigmoid score, threshold 0.5."""
    rng = np.random.default_rng(1)
    y = (rng.random(600) < 0.15).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(-1.5, 1.2, 600) + 2.0 * y)))
    return y, p, (p >= 0.5).astype(int)


# -- thin wrappers: the same numbers as scikit-learn ------------------------------------------
def test_accuracy_and_balanced_accuracy_match_sklearn(multiclass):
    y, _, pred = multiclass
    assert M.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert M.balanced_accuracy(y, pred) == pytest.approx(
        skm.balanced_accuracy_score(y, pred), abs=1e-12
    )
    # a predicted class that never occurs in y is left out of the mean (ISIC's rule)
    y2, pred2 = y[y != 5], pred[y != 5].copy()
    pred2[:3] = 5
    present = np.unique(y2)
    expected = np.mean(skm.recall_score(y2, pred2, labels=present, average=None))
    assert M.balanced_accuracy(y2, pred2) == pytest.approx(expected, abs=1e-12)


def test_per_class_sens_spec_matches_sklearn_recall(multiclass):
    y, _, pred = multiclass
    classes = np.arange(len(PRIORS))
    out = M.per_class_sens_spec(y, pred, classes)
    recall = skm.recall_score(y, pred, labels=classes, average=None)
    for c in classes:
        assert out[c]["sensitivity"] == pytest.approx(recall[c], abs=1e-12)
        assert out[c]["specificity"] == pytest.approx(
            skm.recall_score(y != c, pred != c), abs=1e-12
        )
        assert out[c]["support"] == int((y == c).sum())
    # a class nobody has: sensitivity undefined, specificity still defined
    absent = M.per_class_sens_spec(y, pred, np.array([0, 9]))[9]
    assert np.isnan(absent["sensitivity"]) and absent["support"] == 0
    assert absent["specificity"] == 1.0


def test_per_class_sensitivity_specificity_by_hand():
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0])
    out = M.per_class_sens_spec(y, pred, np.arange(3))
    assert out[0] == {"sensitivity": 0.5, "specificity": pytest.approx(2 / 3), "support": 2}
    assert out[2]["sensitivity"] == 0.0


def test_macro_auroc_matches_sklearn_ovr_and_skips_classes_without_positives(multiclass):
    y, probs, _ = multiclass
    expected = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert M.macro_auroc(y, probs) == pytest.approx(expected, abs=1e-12)
    assert M.macro_auroc(np.eye(probs.shape[1])[y], probs) == pytest.approx(expected, abs=1e-12)
    # without class 5 in y scikit-learn's ovr refuses; here its column is skipped
    keep = y != 5
    cols = [k for k in range(probs.shape[1]) if k != 5]
    per_col = [skm.roc_auc_score(y[keep] == k, probs[keep, k]) for k in cols]
    assert M.macro_auroc(y[keep], probs[keep]) == pytest.approx(np.mean(per_col), abs=1e-12)


def test_auroc_columns_match_sklearn_with_ties_and_skip_single_class_columns():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (300, 3))
    y[:, 2] = 1  # no negatives: undefined
    scores = np.round(rng.random((300, 3)) + 0.3 * y, 1)  # rounding makes ties
    aucs = M.auroc_columns(y, scores)
    for k in range(2):
        assert aucs[k] == pytest.approx(skm.roc_auc_score(y[:, k], scores[:, k]), abs=1e-12)
    assert np.isnan(aucs[2])
    assert M.binary_auroc(y[:, 0], scores[:, 0]) == pytest.approx(aucs[0])
    assert np.isnan(M.binary_auroc(np.ones(5), np.arange(5)))
    scores[7, 1] = np.nan  # undefined scores give an undefined AUROC, not an error
    assert np.isnan(M.auroc_columns(y, scores)[1])


def test_binary_auroc_matches_sklearn(binary):
    y, p, _ = binary
    assert M.binary_auroc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert M.binary_auroc(y.astype(bool), p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)


def test_brier_and_nll_match_sklearn(multiclass, binary):
    y, probs, _ = multiclass
    labels = np.arange(probs.shape[1])
    by_hand = np.mean(np.sum((probs - np.eye(len(labels))[y]) ** 2, axis=1))
    assert M.brier(probs, y) == pytest.approx(by_hand, abs=1e-12)
    assert M.brier(probs, y) == pytest.approx(
        skm.brier_score_loss(y, probs, labels=labels, scale_by_half=False), abs=1e-12
    )
    assert M.nll(probs, y) == pytest.approx(skm.log_loss(y, probs, labels=labels), abs=1e-12)
    # float32 probabilities (as the model emits) are scored in float64
    assert M.nll(probs.astype(np.float32), y) == pytest.approx(M.nll(probs, y), rel=1e-6)
    # two-class rows: the summed (unhalved) Brier is twice scikit-learn's binary Brier
    yb, p, _ = binary
    assert M.brier(M.binary_probs(p), yb) == pytest.approx(2 * skm.brier_score_loss(yb, p))
    assert M.nll(M.binary_probs(p), yb) == pytest.approx(skm.log_loss(yb, p), abs=1e-12)


def test_brier_and_nll_of_a_perfect_prediction_and_the_nll_floor():
    y = np.array([0, 2, 1])
    probs = np.eye(3)[y]
    assert M.brier(probs, y) == 0.0
    assert M.nll(probs, y) == pytest.approx(0.0, abs=1e-9)
    wrong = np.eye(3)[(y + 1) % 3]  # true class at probability 0: floored at 1e-12
    assert M.nll(wrong, y) == pytest.approx(-np.log(1e-12))
    assert M.brier(wrong, y) == 2.0


def test_top_k_accuracy_matches_sklearn(multiclass):
    y, probs, pred = multiclass
    labels = np.arange(probs.shape[1])
    for k in (1, 2, 3, 5):
        assert M.top_k_accuracy(y, probs, k) == pytest.approx(
            skm.top_k_accuracy_score(y, probs, k=k, labels=labels), abs=1e-12
        )
    assert M.top_k_accuracy(y, probs, 1) == pytest.approx(M.accuracy(y, pred))
    assert M.top_k_accuracy(y, probs, 7) == 1.0
    # two columns (scikit-learn would read them as a binary problem)
    two = probs[:, :2]
    assert M.top_k_accuracy(y % 2, two, 1) == pytest.approx(np.mean(two.argmax(1) == y % 2))
    assert M.top_k_accuracy(y % 2, two, 2) == 1.0


def test_top_k_accuracy_by_hand():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    y = np.array([2, 0, 0])
    assert M.top_k_accuracy(y, scores, 1) == pytest.approx(1 / 3)
    assert M.top_k_accuracy(y, scores, 2) == pytest.approx(2 / 3)
    assert M.top_k_accuracy(y, scores, 3) == 1.0


def test_binary_report_and_its_parts_match_sklearn(binary):
    y, _, pred = binary
    rep = M.binary_report(y, pred)
    assert rep["sensitivity"] == pytest.approx(skm.recall_score(y, pred), abs=1e-12)
    assert rep["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0), abs=1e-12)
    assert rep["precision"] == pytest.approx(skm.precision_score(y, pred), abs=1e-12)
    assert rep["f1"] == pytest.approx(skm.f1_score(y, pred), abs=1e-12)
    assert M.sensitivity(y, pred) == rep["sensitivity"]
    assert M.specificity(y, pred) == rep["specificity"]
    assert M.f1(y, pred) == rep["f1"]
    assert M.binary_report(y.astype(bool), pred.astype(bool)) == rep


def test_binary_report_by_hand_and_undefined_parts_are_nan():
    rep = M.binary_report(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert rep["sensitivity"] == pytest.approx(2 / 3)
    assert rep["specificity"] == pytest.approx(1 / 2)
    assert rep["precision"] == pytest.approx(2 / 3)
    assert rep["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    no_pos = M.binary_report(np.zeros(4, int), np.array([0, 1, 0, 0]))
    assert np.isnan(no_pos["sensitivity"]) and no_pos["specificity"] == 0.75
    assert no_pos["precision"] == 0.0 and no_pos["f1"] == 0.0
    all_neg = M.binary_report(np.zeros(4, int), np.zeros(4, int))
    assert np.isnan(all_neg["precision"]) and np.isnan(all_neg["f1"])
    assert all_neg["specificity"] == 1.0


def test_empty_input_is_nan_not_an_error():
    e, probs = np.array([], int), np.zeros((0, 3))
    for v in (
        M.accuracy(e, e),
        M.balanced_accuracy(e, e),
        M.macro_auroc(e, probs),
        M.binary_auroc(e, np.array([])),
        M.brier(probs, e),
        M.nll(probs, e),
        M.top_k_accuracy(e, probs, 1),
        *M.binary_report(e, e).values(),
    ):
        assert np.isnan(v)
    assert M.per_class_sens_spec(e, e, np.arange(2))[1]["support"] == 0


# -- ECE and reliability bins (not in scikit-learn) -------------------------------------------
# Five two-class predictions; top-1 confidence and whether it was right:
#   0.95 right, 0.92 wrong  -> bin (0.9, 1.0]: accuracy 1/2, confidence 0.935
#   0.75 right, 0.72 right  -> bin (0.7, 0.8]: accuracy 1,   confidence 0.735
#   0.55 wrong              -> bin (0.5, 0.6]: accuracy 0,   confidence 0.55
HAND_PROBS = np.array([[0.95, 0.05], [0.92, 0.08], [0.25, 0.75], [0.72, 0.28], [0.45, 0.55]])
HAND_Y = np.array([0, 1, 1, 0, 0])


def test_ece_on_a_hand_computed_example():
    expected = 2 / 5 * (0.935 - 0.5) + 2 / 5 * (1 - 0.735) + 1 / 5 * 0.55
    assert expected == pytest.approx(0.39)
    assert M.ece(HAND_PROBS, HAND_Y, 10) == pytest.approx(expected, abs=1e-12)
    # one bin: the gap between overall accuracy and mean confidence
    assert M.ece(HAND_PROBS, HAND_Y, 1) == pytest.approx(abs(3 / 5 - 3.89 / 5), abs=1e-12)


def test_reliability_bins_on_the_hand_computed_example():
    bins = M.reliability_bins(HAND_PROBS, HAND_Y, 10)
    assert [(b["lo"], b["hi"], b["count"]) for b in bins] == [
        (pytest.approx(0.5), pytest.approx(0.6), 1),
        (pytest.approx(0.7), pytest.approx(0.8), 2),
        (pytest.approx(0.9), pytest.approx(1.0), 2),
    ]
    assert [b["accuracy"] for b in bins] == [0.0, 1.0, 0.5]
    assert [b["confidence"] for b in bins] == pytest.approx([0.55, 0.735, 0.935])


def test_ece_zero_for_perfectly_calibrated_and_positive_for_overconfident():
    y = np.array([0, 1] * 50)
    probs = np.tile([0.5, 0.5], (100, 1))
    assert M.ece(probs, y) == pytest.approx(0.0, abs=1e-9)
    over = np.tile([0.99, 0.01], (100, 1))  # says class 0 at 99 %, right half the time
    assert M.ece(over, y) == pytest.approx(0.49, abs=1e-6)


def test_reliability_bins_weight_to_ece():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(4), 500)
    y = rng.integers(0, 4, 500)
    bins = M.reliability_bins(probs, y, 15)
    assert sum(b["count"] for b in bins) == 500
    gap = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / 500
    assert gap == pytest.approx(M.ece(probs, y, 15))


# -- retrieval (not in scikit-learn) ----------------------------------------------------------
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


# -- bootstrap CIs (not in scikit-learn) ------------------------------------------------------
def _coin(n, p, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.where(rng.random(n) < p, y, 1 - y)


def test_bootstrap_ci_brackets_the_estimate_with_the_normal_width():
    y, pred = _coin(400, 0.8, 2)
    acc = M.accuracy(y, pred)
    lo, hi = M.bootstrap_ci(M.accuracy, y, pred, n=1000)
    assert lo < acc < hi
    # percentile interval of a proportion ~ +-1.96 standard errors
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(acc * (1 - acc) / 400), rel=0.15)
    assert M.bootstrap_ci(M.accuracy, y, pred, n=1000) == (lo, hi)  # seeded
    lo90, hi90 = M.bootstrap_ci(M.accuracy, y, pred, n=1000, alpha=0.1)
    assert lo <= lo90 < hi90 <= hi


def test_bootstrap_ci_shrinks_like_one_over_root_n():
    widths = []
    for n in (100, 1600):
        y, pred = _coin(n, 0.75, 3)
        lo, hi = M.bootstrap_ci(M.accuracy, y, pred, n=500)
        widths.append(hi - lo)
    assert widths[0] / widths[1] == pytest.approx(4, rel=0.35)  # sqrt(1600 / 100)


def test_bootstrap_ci_of_a_constant_is_that_constant():
    assert M.bootstrap_ci(lambda a: float(a.mean()), np.full(30, 0.7), n=50) == (
        pytest.approx(0.7),
        pytest.approx(0.7),
    )


def test_grouped_bootstrap_resamples_whole_groups():
    groups = np.repeat(["a", "b", "c", "d", "e"], [1, 2, 3, 4, 5])
    seen = []

    def check(rows):
        counts = np.bincount(rows, minlength=len(groups))
        for g in np.unique(groups):  # every row of a group is drawn equally often
            assert len(set(counts[groups == g])) == 1
        seen.append(len(rows))
        return 0.0

    M.bootstrap_ci(check, np.arange(len(groups)), n=50, groups=groups)
    assert len(seen) == 50 and len(set(seen)) > 1  # sizes vary with the groups drawn
    # one group: every resample is the whole data set, so the CI is the estimate itself
    rng = np.random.default_rng(6)
    v = rng.random(40)
    lo, hi = M.bootstrap_ci(lambda a: float(a.mean()), v, n=30, groups=np.zeros(40))
    assert lo == pytest.approx(v.mean()) and hi == pytest.approx(v.mean())


def test_grouped_bootstrap_is_wider_for_clustered_data():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(40), 10)  # 40 patients, 10 images each, all alike
    correct = np.repeat(rng.random(40) < 0.6, 10).astype(float)
    mean = lambda a: float(a.mean())  # noqa: E731
    lo_r, hi_r = M.bootstrap_ci(mean, correct, n=400)
    lo_g, hi_g = M.bootstrap_ci(mean, correct, n=400, groups=groups)
    assert (hi_g - lo_g) > 1.8 * (hi_r - lo_r)
    # the cluster bootstrap of 40 patients is as wide as a row bootstrap of 40 rows
    lo_p, hi_p = M.bootstrap_ci(mean, correct[::10], n=400)
    assert hi_g - lo_g == pytest.approx(hi_p - lo_p, rel=0.3)


def test_bootstrap_drops_undefined_resamples():
    rng = np.random.default_rng(7)
    y = np.zeros(60, int)
    y[:2] = 1  # two positives: many resamples have none, so AUROC is undefined there
    s = rng.random(60) + y
    lo, hi = M.bootstrap_ci(M.binary_auroc, y, s, n=200)
    assert 0.5 < lo <= hi <= 1.0
    assert np.isnan(M.bootstrap_ci(M.binary_auroc, np.ones(20, int), s[:20], n=20)).all()

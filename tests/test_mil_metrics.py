"""Clinical evaluation metrics of mil.evaluation against scikit-learn, scipy and hand examples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from scipy.special import softmax
from scipy.stats import binomtest, chi2
from sklearn import metrics as skm

import mil.evaluation as ev


def _multiclass(n: int = 150, n_classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with every class present and informative softmax probabilities."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.2
    return y, softmax(logits, axis=1)


def _binary(n: int = 120, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and positive-class probabilities rounded to 0.01 (so with ties)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    p = np.round(1.0 / (1.0 + np.exp(-(rng.normal(size=n) + 1.5 * (2 * y - 1)))), 2)
    return y, p


def test_binary_metrics_match_sklearn() -> None:
    y, p = _binary()
    threshold = 0.37
    pred = (p >= threshold).astype(int)
    m = ev.compute_metrics(y, p, task="binary", threshold=threshold)
    tn, fp, fn, _ = skm.confusion_matrix(y, pred).ravel()
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["npv"] == pytest.approx(tn / (tn + fn))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p))
    two_column = ev.compute_metrics(y, np.stack([1 - p, p], axis=1), task="binary",
                                    threshold=threshold)
    assert two_column == pytest.approx(m)
    fpr, tpr = ev.roc_curve(y, p)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(np.c_[fpr, tpr], np.c_[sk_fpr, sk_tpr])


def test_multiclass_and_ordinal_metrics_match_sklearn() -> None:
    y, p = _multiclass()
    names = ["benign", "low", "mid", "high"]
    pred = p.argmax(axis=1)
    m = ev.compute_metrics(y, p, task="ordinal", label_names=names)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["quadratic_kappa"] == pytest.approx(
        skm.cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p))
    recall = skm.recall_score(y, pred, average=None)
    precision = skm.precision_score(y, pred, average=None)
    f1 = skm.f1_score(y, pred, average=None)
    np.testing.assert_array_equal(ev.confusion_matrix(y, pred, 4), skm.confusion_matrix(y, pred))
    one_vs_rest = skm.multilabel_confusion_matrix(y, pred)  # per class [[tn, fp], [fn, tp]]
    for c, name in enumerate(names):
        (tn, fp), (fn, _) = one_vs_rest[c]
        assert m[f"sensitivity_{name}"] == pytest.approx(recall[c])
        assert m[f"ppv_{name}"] == pytest.approx(precision[c])
        assert m[f"f1_{name}"] == pytest.approx(f1[c])
        assert m[f"specificity_{name}"] == pytest.approx(tn / (tn + fp))
        assert m[f"npv_{name}"] == pytest.approx(tn / (tn + fn))
    assert m["macro_sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["macro_ppv"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert "quadratic_kappa" not in ev.compute_metrics(y, p, task="multiclass")


def test_undefined_metrics_are_nan() -> None:
    m = ev.compute_metrics([1, 1, 1], [0.2, 0.7, 0.9], task="binary", threshold=0.5)
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["npv"] == 0.0
    none_predicted = ev.compute_metrics([0, 1], [0.1, 0.2], task="binary", threshold=0.5)
    assert math.isnan(none_predicted["ppv"]) and none_predicted["f1"] == 0.0


def test_ece_hand_examples() -> None:
    # Bins of width 0.2: 0.1 | 0.2 | (empty) | (empty) | 0.8, 0.9, 0.95.
    y = [0, 1, 1, 1, 0]
    p = [0.1, 0.2, 0.8, 0.9, 0.95]
    gap_top = abs(2 / 3 - (0.8 + 0.9 + 0.95) / 3)
    expected = (1 * 0.1 + 1 * 0.8 + 3 * gap_top) / 5
    assert expected == pytest.approx(0.31)
    assert ev.expected_calibration_error(y, p, n_bins=5) == pytest.approx(expected)
    # Multi-class: confidences 0.5 (right), 0.7 (wrong), 0.9 (right) in separate bins of ten.
    probs = np.array([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1], [0.05, 0.05, 0.9]])
    assert ev.expected_calibration_error([0, 1, 2], probs, n_bins=10) == pytest.approx(1.3 / 3)
    assert ev.expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0


def test_youden_and_sensitivity_thresholds_by_hand() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.9])
    # J: 0.9 -> 1/3, 0.8 -> 2/3, 0.4 -> 1/3, 0.35 -> 0, 0.3 -> 1/3, 0.1 -> 0.
    # The best operating point calls 0.8 and 0.9 positive; the threshold sits mid-gap to 0.4.
    assert ev.choose_threshold(y, p, "youden") == pytest.approx(0.6)
    # A tie in J (0.8 and 0.4 both give 0.5) resolves to the higher point, mid-gap to 0.6.
    assert ev.choose_threshold([0, 1, 0, 1], [0.2, 0.4, 0.6, 0.8], "youden") == pytest.approx(0.7)
    assert ev.choose_threshold(y, p, "sensitivity", target=0.6) == 0.8
    assert ev.choose_threshold(y, p, "sensitivity", target=2 / 3) == 0.8
    assert ev.choose_threshold(y, p, "sensitivity", target=0.9) == 0.3
    with pytest.raises(ValueError, match="both positive and negative"):
        ev.choose_threshold([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="unknown threshold method"):
        ev.choose_threshold([0, 1], [0.2, 0.3], method="f1")  # type: ignore[arg-type]


def test_sensitivity_threshold_is_the_highest_meeting_the_target() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        y = (rng.random(60) < 0.5).astype(int)
        y[:2] = [0, 1]
        p = np.round(rng.random(60), 1)
        target = float(rng.uniform(0.3, 1.0))
        t = ev.choose_threshold(y, p, "sensitivity", target=target)
        assert np.mean(p[y == 1] >= t) >= target
        higher = np.unique(p[p > t])
        assert all(np.mean(p[y == 1] >= h) < target for h in higher)
        j = ev.choose_threshold(y, p, "youden")
        fpr, tpr, thresholds = skm.roc_curve(y, p)
        assert np.mean(p[y == 1] >= j) - np.mean(p[y == 0] >= j) == pytest.approx(
            np.max(tpr - fpr))
        assert np.min(p[p >= j]) in thresholds  # the operating point is an ROC point


def _vectors(a: int, b: int, c: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth and two models' predictions realising the paired table [[a, b], [c, d]]."""
    correct_a = np.r_[np.ones(a + b), np.zeros(c + d)].astype(bool)
    correct_b = np.r_[np.ones(a), np.zeros(b), np.ones(c), np.zeros(d)].astype(bool)
    y = np.zeros(a + b + c + d, dtype=int)
    return y, (~correct_a).astype(int), (~correct_b).astype(int)


def test_mcnemar_exact_and_chi_square_branches() -> None:
    y, pred_a, pred_b = _vectors(40, 3, 9, 8)
    result = ev.compare_models(y, pred_a, pred_b)
    np.testing.assert_array_equal(result.table, [[40, 3], [9, 8]])
    assert result.method == "exact-binomial"
    assert result.p_value == pytest.approx(binomtest(3, 12, 0.5).pvalue)
    assert result.accuracy_a == pytest.approx(43 / 60)
    assert result.accuracy_b == pytest.approx(49 / 60)
    assert result.difference == pytest.approx(-6 / 60)
    assert result.difference_low < result.difference < result.difference_high
    assert ev.mcnemar_test([[5, 0], [0, 5]]) == (0.0, 1.0, "exact-binomial")
    y, pred_a, pred_b = _vectors(50, 30, 12, 8)
    result = ev.compare_models(y, pred_a, pred_b)
    assert result.method == "chi-square-continuity-corrected"
    statistic = (abs(30 - 12) - 1) ** 2 / 42
    assert result.statistic == pytest.approx(statistic)
    assert result.p_value == pytest.approx(chi2.sf(statistic, 1))
    assert ev.compare_models(y, pred_a, pred_b, exact_below=100).method == "exact-binomial"


def test_wilson_and_newcombe_intervals_by_hand() -> None:
    ci = binomtest(7, 20).proportion_ci(confidence_level=0.95, method="wilson")
    assert ev.wilson_interval(7, 20) == pytest.approx((ci.low, ci.high))
    # a*d - b*c = 5 lies in [0, n/2], so phi = 0 and the interval is square-and-add of Wilson.
    table = np.array([[10, 5], [5, 3]])
    low, high = ev.wilson_interval(15, 23)  # both accuracies are 15/23
    half = math.hypot(15 / 23 - low, high - 15 / 23)
    assert ev.newcombe_paired_interval(table) == pytest.approx((-half, half))
    # General case: phi from a*d - b*c - n/2 (here 50*20 - 4*16 - 45 = 891).
    a, b, c, d, n = 50, 4, 16, 20, 90
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = ev.wilson_interval(a + b, n)
    l2, u2 = ev.wilson_interval(a + c, n)
    phi = (a * d - b * c - n / 2) / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    low = p1 - p2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = p1 - p2 + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    assert ev.newcombe_paired_interval([[a, b], [c, d]]) == pytest.approx((low, high))
    assert ev.correctness_table([1, 1, 0], [1, 0, 0]).tolist() == [[1, 1], [0, 1]]


def test_bootstrap_intervals_contain_estimates_and_report_usage() -> None:
    y, p = _multiclass(n=120, seed=7)
    groups = np.arange(y.size) // 2
    result = ev.evaluate_predictions(y, p, task="ordinal", groups=groups, n_bootstrap=150, seed=1)
    for name in ("auc", "accuracy", "balanced_accuracy", "quadratic_kappa", "brier", "macro_f1"):
        r = result[name]
        assert r.low <= r.value <= r.high, name
    # ECE is biased upwards by resampling, so only its bookkeeping is checked here.
    assert all(r.n_bootstrap == 150 for r in result.values())
    assert result["ece"].low < result["ece"].high
    assert "auc" in ev.format_metrics(result)
    again = ev.evaluate_predictions(y, p, task="ordinal", groups=groups, n_bootstrap=150, seed=1)
    assert again == result
    # Eight slides: many resamples lack a class, and the AUC is skipped there.
    tiny = ev.evaluate_predictions([0, 0, 0, 0, 0, 0, 1, 1], np.linspace(0.1, 0.9, 8),
                                   task="binary", n_bootstrap=200, seed=0)
    assert tiny["accuracy"].n_bootstrap == 200
    assert 0 < tiny["auc"].n_bootstrap < 200


def test_resamples_draw_whole_patients() -> None:
    groups = np.repeat(np.array(["p0", "p1", "p2", "p3", "p4"]), [1, 2, 3, 4, 5])
    sizes = {"p0": 1, "p1": 2, "p2": 3, "p3": 4, "p4": 5}
    for rows in ev.bootstrap_resamples(groups.size, groups, n_bootstrap=50, seed=3):
        drawn, counts = np.unique(groups[rows], return_counts=True)
        assert sum(c // sizes[g] for g, c in zip(drawn, counts, strict=True)) == 5
        assert all(c % sizes[g] == 0 for g, c in zip(drawn, counts, strict=True))


def test_duplicated_slides_do_not_narrow_patient_level_intervals() -> None:
    y, p = _binary(n=80, seed=8)
    patients = np.arange(y.size)
    one = ev.evaluate_predictions(y, p, task="binary", groups=patients, n_bootstrap=300, seed=2)
    y5, p5, patients5 = np.repeat(y, 5), np.repeat(p, 5), np.repeat(patients, 5)
    grouped = ev.evaluate_predictions(y5, p5, task="binary", groups=patients5, n_bootstrap=300,
                                      seed=2)
    independent = ev.evaluate_predictions(y5, p5, task="binary", n_bootstrap=300, seed=2)
    for name in ("auc", "accuracy"):
        width = one[name].high - one[name].low
        assert grouped[name].high - grouped[name].low == pytest.approx(width)
        assert independent[name].high - independent[name].low < 0.7 * width


def test_metrics_by_group_equals_subset_evaluation() -> None:
    y, p = _multiclass(n=160, n_classes=3, seed=9)
    sites = np.where(np.arange(y.size) % 4 == 0, "B", "A")
    groups = np.arange(y.size) // 2
    by_site = ev.metrics_by_group(y, p, sites, task="multiclass", groups=groups, n_bootstrap=60)
    assert list(by_site) == ["A", "B"]
    mask = sites == "B"
    direct = ev.evaluate_predictions(y[mask], p[mask], task="multiclass", groups=groups[mask],
                                     n_bootstrap=60)
    assert by_site["B"] == direct


def test_temperature_scaling_fixes_overconfidence() -> None:
    rng = np.random.default_rng(11)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        true_logits = rng.normal(size=(n, 3)) * 1.5
        y = np.array([rng.choice(3, p=row) for row in softmax(true_logits, axis=1)])
        return true_logits * 4.0, y  # a model four times too confident

    val_logits, val_y = sample(600)
    test_logits, test_y = sample(600)
    assert ev.fit_temperature(val_logits, val_y) == pytest.approx(4.0, rel=0.25)
    result = ev.temperature_scale(val_logits, val_y, test_logits, test_y)
    assert result.temperature > 1.0
    assert result.after["nll"] < result.before["nll"]
    assert result.after["ece"] < result.before["ece"]
    assert result.after["brier"] < result.before["brier"]
    assert result.after["nll"] == pytest.approx(
        ev.negative_log_likelihood(test_y, result.probabilities))
    z = np.array([-2.0, 0.5, 3.0])
    np.testing.assert_allclose(ev.apply_temperature(z, 2.0)[:, 1], 1 / (1 + np.exp(-z / 2.0)))


def test_input_errors() -> None:
    y, p = _multiclass(n=20)
    with pytest.raises(ValueError, match="binary task needs two classes"):
        ev.compute_metrics(y, p, task="binary")
    with pytest.raises(ValueError, match="binary tasks only"):
        ev.compute_metrics(y, p, task="multiclass", threshold=0.5)
    with pytest.raises(ValueError, match="within"):
        ev.compute_metrics([0, 1], [1.5, 0.2], task="binary")
    with pytest.raises(ValueError, match="outside"):
        ev.compute_metrics([0, 2], [0.5, 0.2], task="binary")
    with pytest.raises(ValueError, match="label names"):
        ev.compute_metrics(y, p, task="multiclass", label_names=["a", "b"])


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    y, p = _multiclass(n=80, seed=12)
    names = ["G0", "G1", "G2", "G3"]
    _assert_png(ev.plot_roc_curves(y, p, tmp_path / "roc.png", names))
    _assert_png(ev.plot_reliability_diagram(y, p, tmp_path / "rel.png"))
    _assert_png(ev.plot_confusion_matrix(y, p, tmp_path / "nested" / "cm.png", names))
    yb, pb = _binary(n=60)
    _assert_png(ev.plot_roc_curves(yb, pb, tmp_path / "roc_binary.png"))
    _assert_png(ev.plot_reliability_diagram(yb, pb, tmp_path / "rel_binary.png", n_bins=10))
    _assert_png(ev.plot_confusion_matrix(yb, pb, tmp_path / "cm_binary.png", threshold=0.3))

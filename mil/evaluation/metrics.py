"""Point metrics for slide-level grading: binary, multi-class and ordinal.

Conventions used throughout :mod:`mil.evaluation`:

* ``y_true`` holds integer class indices ``0 .. C-1``; ``probabilities`` is ``(n, C)``. For binary
  tasks class 1 is the positive class, and a ``(n,)`` vector of positive-class probabilities is
  accepted in place of the ``(n, 2)`` matrix.
* A metric that is undefined on the data at hand (a ratio with a zero denominator, an AUC with a
  single class present) is ``nan``, never a silent 0. The bootstrap skips such resamples and
  reports how many it used.
* One-vs-rest statistics for class ``c``: TP = true ``c`` predicted ``c``; FN = true ``c``
  predicted otherwise; FP = true other predicted ``c``; TN = the rest. Sensitivity = TP/(TP+FN),
  specificity = TN/(TN+FP), PPV = TP/(TP+FP), NPV = TN/(TN+FN), F1 = 2TP/(2TP+FP+FN).
* Macro averages (macro AUC, balanced accuracy, ``macro_*``) are the unweighted mean over all
  ``C`` classes and are ``nan`` as soon as one class's value is undefined, so every bootstrap
  resample averages over the same classes. scikit-learn instead drops or zeroes such classes with
  a warning; on data where every class is present and predicted the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import rankdata

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def check_predictions(
    y_true: ArrayLike, probabilities: ArrayLike, n_classes: int | None = None
) -> tuple[IntArray, FloatArray]:
    """Validate and normalise labels and probabilities.

    Args:
        y_true: ``(n,)`` integer class indices.
        probabilities: ``(n, C)`` class probabilities, or ``(n,)`` positive-class probabilities
            of a binary task (expanded to ``(n, 2)``).
        n_classes: expected ``C``; inferred from ``probabilities`` when omitted.

    Returns:
        ``(y, p)`` as ``int64`` ``(n,)`` and ``float64`` ``(n, C)`` arrays.

    Raises:
        ValueError: on shape mismatches, non-finite or out-of-range probabilities, labels outside
            ``0 .. C-1`` or an empty input.
    """
    y = np.asarray(y_true)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if y.ndim != 1 or p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true {y.shape} and probabilities {p.shape} do not match: need "
                         "(n,) and (n, C)")
    if y.size == 0:
        raise ValueError("no predictions to evaluate")
    integral = y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0))
    if not integral:
        raise ValueError("y_true must hold integer class indices")
    y = y.astype(np.int64)
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"probabilities have {p.shape[1]} columns, expected {n_classes}")
    if p.shape[1] < 2:
        raise ValueError("need at least two classes")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probabilities must be finite and within [0, 1]")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true holds labels outside 0..{p.shape[1] - 1}")
    return y, p


def _ratio(numerator: ArrayLike, denominator: ArrayLike) -> FloatArray:
    """Elementwise ``numerator / denominator`` with ``nan`` where the denominator is zero."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> IntArray:
    """Counts with rows = true class and columns = predicted class (scikit-learn's layout)."""
    t = np.asarray(y_true, dtype=np.int64)
    q = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(t * n_classes + q, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def roc_auc(y_binary: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve as the Mann–Whitney statistic (ties count one half).

    Returns ``nan`` when only one class is present.
    """
    y = np.asarray(y_binary).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    u_statistic = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def roc_curve(y_binary: ArrayLike, scores: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """False- and true-positive rates at every distinct score, starting from ``(0, 0)``."""
    y = np.asarray(y_binary).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def macro_ovr_auc(y_true: ArrayLike, probabilities: ArrayLike) -> float:
    """Unweighted mean of the one-vs-rest AUCs; ``nan`` unless every class is present."""
    y, p = check_predictions(y_true, probabilities)
    aucs = [roc_auc(y == c, p[:, c]) for c in range(p.shape[1])]
    return float(np.mean(aucs))


def one_vs_rest_rates(cm: ArrayLike) -> dict[str, FloatArray]:
    """Per-class sensitivity, specificity, PPV, NPV and F1 from a confusion matrix."""
    counts = np.asarray(cm, dtype=np.float64)
    tp = np.diag(counts)
    fn = counts.sum(axis=1) - tp
    fp = counts.sum(axis=0) - tp
    tn = counts.sum() - tp - fn - fp
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2.0 * tp, 2.0 * tp + fp + fn),
    }


def quadratic_weighted_kappa(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> float:
    """Cohen's kappa with quadratic disagreement weights ``(i - j)^2`` over grades ``0..C-1``.

    The weights use the full grade range, so a grade absent from both raters still counts in the
    distance between its neighbours (scikit-learn re-indexes to the labels present; the two agree
    whenever every grade occurs). ``nan`` when the chance-expected disagreement is zero.
    """
    observed = confusion_matrix(y_true, y_pred, n_classes).astype(np.float64)
    grades = np.arange(n_classes, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    expected_disagreement = float((weights * expected).sum())
    if expected_disagreement == 0.0:
        return float("nan")
    return 1.0 - float((weights * observed).sum()) / expected_disagreement


def binary_metrics(y_true: ArrayLike, p_positive: ArrayLike, threshold: float) -> dict[str, float]:
    """Discrimination and threshold metrics of a binary task; positive when ``p >= threshold``.

    Keys: ``auc, accuracy, balanced_accuracy, sensitivity, specificity, ppv, npv, f1``.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(p_positive, dtype=np.float64)
    y_pred = (p >= threshold).astype(np.int64)
    rates = one_vs_rest_rates(confusion_matrix(y, y_pred, 2))
    sensitivity, specificity = float(rates["sensitivity"][1]), float(rates["specificity"][1])
    return {
        "auc": roc_auc(y == 1, p),
        "accuracy": float(np.mean(y_pred == y)),
        "balanced_accuracy": (sensitivity + specificity) / 2.0,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": float(rates["ppv"][1]),
        "npv": float(rates["npv"][1]),
        "f1": float(rates["f1"][1]),
    }


def multiclass_metrics(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    label_names: Sequence[str] | None = None,
    *,
    ordinal: bool = False,
) -> dict[str, float]:
    """Metrics of argmax predictions over ``C`` classes.

    Keys: ``auc`` (macro one-vs-rest), ``accuracy``, ``balanced_accuracy``, per class
    ``sensitivity_<name>``, ``specificity_<name>``, ``ppv_<name>``, ``npv_<name>``, ``f1_<name>``,
    the ``macro_*`` means of those five and, when ``ordinal``, ``quadratic_kappa``.
    """
    y, p = check_predictions(y_true, probabilities)
    n_classes = p.shape[1]
    names = class_names(n_classes, label_names)
    y_pred = np.argmax(p, axis=1)
    rates = one_vs_rest_rates(confusion_matrix(y, y_pred, n_classes))
    out: dict[str, float] = {
        "auc": macro_ovr_auc(y, p),
        "accuracy": float(np.mean(y_pred == y)),
        "balanced_accuracy": float(np.mean(rates["sensitivity"])),
    }
    for metric, values in rates.items():
        for name, value in zip(names, values, strict=True):
            out[f"{metric}_{name}"] = float(value)
        out[f"macro_{metric}"] = float(np.mean(values))
    if ordinal:
        out["quadratic_kappa"] = quadratic_weighted_kappa(y, y_pred, n_classes)
    return out


def class_names(n_classes: int, label_names: Sequence[str] | None) -> list[str]:
    """The given label names (checked against ``n_classes``) or ``"0" .. "C-1"``."""
    if label_names is None:
        return [str(c) for c in range(n_classes)]
    names = [str(name) for name in label_names]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} label names for {n_classes} classes")
    if len(set(names)) != len(names):
        raise ValueError(f"label names are not unique: {names}")
    return names

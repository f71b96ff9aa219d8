"""Single entry points: all metrics of a task with patient-level bootstrap intervals, overall and
per subgroup (site, scanner, ...)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from .bootstrap import MetricWithCI, bootstrap_confidence_intervals
from .calibration import calibration_metrics
from .metrics import IntArray, binary_metrics, check_predictions, class_names, multiclass_metrics

Task = Literal["binary", "multiclass", "ordinal"]
TASKS: tuple[Task, ...] = ("binary", "multiclass", "ordinal")


def compute_metrics(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    *,
    task: Task,
    threshold: float | None = None,
    label_names: Sequence[str] | None = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """Point estimates of every metric of ``task`` (``nan`` where undefined).

    * ``"binary"`` (two classes, class 1 positive): ``auc, accuracy, balanced_accuracy,
      sensitivity, specificity, ppv, npv, f1`` at ``threshold`` (positive when
      ``p_positive >= threshold``; 0.5 when ``None``), then ``brier, ece, nll``.
    * ``"multiclass"``: argmax predictions; macro one-vs-rest ``auc``, ``accuracy``,
      ``balanced_accuracy``, per-class and ``macro_`` sensitivity/specificity/PPV/NPV/F1, then
      ``brier`` (multi-class), ``ece`` (max probability), ``nll``.
    * ``"ordinal"``: the multi-class metrics plus ``quadratic_kappa``.

    See :mod:`mil.evaluation.metrics` and :mod:`mil.evaluation.calibration` for the definitions.
    """
    y, p = check_predictions(y_true, probabilities)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    if task == "binary":
        if p.shape[1] != 2:
            raise ValueError(f"a binary task needs two classes, got {p.shape[1]}")
        class_names(2, label_names)
        cut = 0.5 if threshold is None else float(threshold)
        out = binary_metrics(y, p[:, 1], cut)
    else:
        if threshold is not None:
            raise ValueError("a threshold applies to binary tasks only (multi-class uses argmax)")
        out = multiclass_metrics(y, p, label_names, ordinal=task == "ordinal")
    out.update(calibration_metrics(y, p, n_bins))
    return out


def evaluate_predictions(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    *,
    task: Task,
    threshold: float | None = None,
    groups: ArrayLike | None = None,
    label_names: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    n_bins: int = 15,
) -> dict[str, MetricWithCI]:
    """Every metric of ``task`` with a patient-level bootstrap confidence interval.

    Args:
        y_true: ``(n,)`` class indices.
        probabilities: ``(n, C)`` probabilities (``(n,)`` positive-class ones for binary).
        task: ``"binary"``, ``"multiclass"`` or ``"ordinal"`` (see :func:`compute_metrics`).
        threshold: binary decision threshold, chosen beforehand on validation data (e.g. with
            :func:`mil.evaluation.choose_threshold`); 0.5 when ``None``. Fixed in every resample.
        groups: ``(n,)`` patient id per slide; resamples draw patients (all their slides come
            along). ``None`` resamples slides independently.
        label_names: class names used in per-class metric keys (default ``"0" .. "C-1"``).
        n_bootstrap: number of resamples (0: point estimates only, ``nan`` bounds).
        seed: resampling seed.
        confidence: interval coverage.
        n_bins: ECE bins.

    Returns:
        ``{metric name: MetricWithCI(value, low, high, n_bootstrap)}``.
    """
    y, p = check_predictions(y_true, probabilities)

    def metric_fn(rows: IntArray) -> dict[str, float]:
        return compute_metrics(y[rows], p[rows], task=task, threshold=threshold,
                               label_names=label_names, n_bins=n_bins)

    return bootstrap_confidence_intervals(
        metric_fn, y.size, groups, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence
    )


def metrics_by_group(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    subgroup_labels: ArrayLike,
    *,
    task: Task,
    threshold: float | None = None,
    groups: ArrayLike | None = None,
    label_names: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    n_bins: int = 15,
) -> dict[str, dict[str, MetricWithCI]]:
    """:func:`evaluate_predictions` separately within each subgroup (e.g. site).

    Args:
        subgroup_labels: ``(n,)`` subgroup of each slide; subgroups are reported in sorted order
            of their string form. Metrics undefined within a subgroup (a class missing at one
            site) are ``nan`` with ``n_bootstrap == 0``.
        Other arguments: as in :func:`evaluate_predictions`; the bootstrap within a subgroup
            resamples that subgroup's patients.

    Returns:
        ``{subgroup: {metric name: MetricWithCI}}``.
    """
    y, p = check_predictions(y_true, probabilities)
    labels = np.asarray(subgroup_labels).astype(str)
    if labels.shape != y.shape:
        raise ValueError(f"subgroup_labels has shape {labels.shape}, expected {y.shape}")
    patient_ids = None if groups is None else np.asarray(groups)
    if patient_ids is not None and patient_ids.shape != y.shape:
        raise ValueError(f"groups has shape {patient_ids.shape}, expected {y.shape}")
    results: dict[str, dict[str, MetricWithCI]] = {}
    for name in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == name)
        results[name] = evaluate_predictions(
            y[rows], p[rows], task=task, threshold=threshold,
            groups=None if patient_ids is None else patient_ids[rows], label_names=label_names,
            n_bootstrap=n_bootstrap, seed=seed, confidence=confidence, n_bins=n_bins,
        )
    return results


def format_metrics(results: Mapping[str, MetricWithCI], digits: int = 3) -> str:
    """A plain-text table: one ``name  value (low–high)  [n resamples]`` line per metric."""
    width = max((len(name) for name in results), default=0)
    lines = []
    for name, metric in results.items():
        lines.append(f"{name:<{width}}  {metric.value:.{digits}f} "
                     f"({metric.low:.{digits}f}–{metric.high:.{digits}f})  "
                     f"[{metric.n_bootstrap} resamples]")
    return "\n".join(lines)

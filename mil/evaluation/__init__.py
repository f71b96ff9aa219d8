"""Clinical evaluation of slide-level predictions, as a validation paper reports it.

* :func:`evaluate_predictions` — every metric of a binary, multi-class or ordinal task with 95 %
  patient-level bootstrap intervals (:class:`MetricWithCI`); :func:`metrics_by_group` per site or
  other subgroup.
* :func:`choose_threshold` — binary operating point on validation data (Youden or a target
  sensitivity), to be frozen and passed as ``threshold`` for the test set.
* :func:`compare_models` — McNemar's test and the Newcombe interval of the paired accuracy
  difference of two models on the same cases.
* :func:`temperature_scale` — temperature scaling fitted on validation logits, with Brier, ECE and
  NLL on the test logits before and after.
* :func:`plot_roc_curves`, :func:`plot_reliability_diagram`, :func:`plot_confusion_matrix`.
"""

from .bootstrap import MetricWithCI, bootstrap_confidence_intervals, bootstrap_resamples
from .calibration import (
    ReliabilityBins,
    TemperatureScalingResult,
    apply_temperature,
    brier_score,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    temperature_scale,
)
from .comparison import (
    PairedComparison,
    compare_models,
    correctness_table,
    mcnemar_test,
    newcombe_paired_interval,
    wilson_interval,
)
from .evaluate import Task, compute_metrics, evaluate_predictions, format_metrics, metrics_by_group
from .metrics import (
    binary_metrics,
    confusion_matrix,
    macro_ovr_auc,
    multiclass_metrics,
    one_vs_rest_rates,
    quadratic_weighted_kappa,
    roc_auc,
    roc_curve,
)
from .plots import plot_confusion_matrix, plot_reliability_diagram, plot_roc_curves
from .thresholds import choose_threshold

__all__ = [
    "MetricWithCI",
    "PairedComparison",
    "ReliabilityBins",
    "Task",
    "TemperatureScalingResult",
    "apply_temperature",
    "binary_metrics",
    "bootstrap_confidence_intervals",
    "bootstrap_resamples",
    "brier_score",
    "calibration_metrics",
    "choose_threshold",
    "compare_models",
    "compute_metrics",
    "confusion_matrix",
    "correctness_table",
    "evaluate_predictions",
    "expected_calibration_error",
    "fit_temperature",
    "format_metrics",
    "macro_ovr_auc",
    "mcnemar_test",
    "metrics_by_group",
    "multiclass_metrics",
    "negative_log_likelihood",
    "newcombe_paired_interval",
    "one_vs_rest_rates",
    "plot_confusion_matrix",
    "plot_reliability_diagram",
    "plot_roc_curves",
    "quadratic_weighted_kappa",
    "reliability_bins",
    "roc_auc",
    "roc_curve",
    "temperature_scale",
    "wilson_interval",
]

"""Calibration: Brier score, expected calibration error, NLL and temperature scaling.

Definitions (``C`` = number of classes):

* Brier score. ``C == 2``: mean over samples of ``(p_positive - y)^2`` (scikit-learn's
  ``brier_score_loss``, range 0–1). ``C > 2``: the multi-class Brier score, mean over samples of
  the sum over classes of ``(p_c - [y == c])^2`` (range 0–2).
* Expected calibration error (ECE) with ``n_bins`` equal-width bins on ``[0, 1]``; bin ``b`` holds
  confidences in ``[b/B, (b+1)/B)``, the last bin also holds 1.0. ``C == 2``: the confidence is the
  positive-class probability and the observed frequency is the fraction of positives in the bin.
  ``C > 2``: the confidence is the maximum probability and the observed frequency is the accuracy
  of the argmax prediction in the bin. ECE = sum over bins of ``n_b / n * |freq_b - conf_b|``.
* Negative log-likelihood (NLL): mean of ``-log p[y]`` with probabilities clipped at ``1e-12``.
* Temperature scaling: probabilities ``softmax(logits / T)`` with one scalar ``T > 0`` fitted on
  validation logits by minimising the NLL (bounded scalar minimisation over ``log T``). A ``(n,)``
  logit vector is a binary logit and is treated as the two-class logits ``[0, z]``, for which
  ``softmax([0, z] / T) = sigmoid(z / T)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from .metrics import FloatArray, IntArray, check_predictions

PROBABILITY_FLOOR = 1e-12


def brier_score(y_true: ArrayLike, probabilities: ArrayLike) -> float:
    """Binary (positive-class) Brier score for two classes, multi-class Brier score otherwise."""
    y, p = check_predictions(y_true, probabilities)
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - y) ** 2))
    one_hot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - one_hot) ** 2, axis=1)))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin summary behind the ECE and the reliability diagram.

    Attributes:
        edges: ``(B + 1,)`` bin edges on ``[0, 1]``.
        confidence: ``(B,)`` mean confidence per bin (``nan`` for empty bins).
        frequency: ``(B,)`` observed positive fraction (binary) or accuracy (multi-class).
        counts: ``(B,)`` samples per bin.
        binary: whether the confidence is the positive-class probability.
    """

    edges: FloatArray
    confidence: FloatArray
    frequency: FloatArray
    counts: IntArray
    binary: bool

    @property
    def ece(self) -> float:
        """Expected calibration error: count-weighted mean ``|frequency - confidence|``."""
        filled = self.counts > 0
        gaps = np.abs(self.frequency[filled] - self.confidence[filled])
        return float(np.sum(self.counts[filled] * gaps) / self.counts.sum())


def reliability_bins(
    y_true: ArrayLike, probabilities: ArrayLike, n_bins: int = 15
) -> ReliabilityBins:
    """Bin the confidences into ``n_bins`` equal-width bins (see the module docstring)."""
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    y, p = check_predictions(y_true, probabilities)
    binary = p.shape[1] == 2
    if binary:
        confidence = p[:, 1]
        outcome = (y == 1).astype(np.float64)
    else:
        confidence = p.max(axis=1)
        outcome = (np.argmax(p, axis=1) == y).astype(np.float64)
    index = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / counts
        mean_freq = np.bincount(index, weights=outcome, minlength=n_bins) / counts
    return ReliabilityBins(
        edges=np.linspace(0.0, 1.0, n_bins + 1),
        confidence=mean_conf,
        frequency=mean_freq,
        counts=counts,
        binary=binary,
    )


def expected_calibration_error(
    y_true: ArrayLike, probabilities: ArrayLike, n_bins: int = 15
) -> float:
    """ECE with equal-width bins (positive-class probability for two classes, max otherwise)."""
    return reliability_bins(y_true, probabilities, n_bins).ece


def negative_log_likelihood(y_true: ArrayLike, probabilities: ArrayLike) -> float:
    """Mean ``-log p[y]`` with probabilities clipped at ``1e-12``."""
    y, p = check_predictions(y_true, probabilities)
    picked = np.clip(p[np.arange(y.size), y], PROBABILITY_FLOOR, 1.0)
    return float(-np.mean(np.log(picked)))


def calibration_metrics(
    y_true: ArrayLike, probabilities: ArrayLike, n_bins: int = 15
) -> dict[str, float]:
    """``{"brier", "ece", "nll"}`` of the given probabilities."""
    return {
        "brier": brier_score(y_true, probabilities),
        "ece": expected_calibration_error(y_true, probabilities, n_bins),
        "nll": negative_log_likelihood(y_true, probabilities),
    }


def _logit_matrix(logits: ArrayLike) -> FloatArray:
    """``(n, C)`` logits; a ``(n,)`` or ``(n, 1)`` binary logit becomes ``[0, z]``."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim == 1:
        z = np.stack([np.zeros_like(z), z], axis=1)
    if z.ndim != 2 or z.shape[1] < 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"logits must be finite with shape (n,) or (n, C); got {z.shape}")
    return z


def apply_temperature(logits: ArrayLike, temperature: float) -> FloatArray:
    """Probabilities ``softmax(logits / temperature)`` as an ``(n, C)`` array."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return np.exp(log_softmax(_logit_matrix(logits) / temperature, axis=1))


def fit_temperature(
    logits: ArrayLike, y_true: ArrayLike, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """Temperature minimising the validation NLL of ``softmax(logits / T)`` within ``bounds``."""
    z = _logit_matrix(logits)
    y, _ = check_predictions(y_true, np.full(z.shape, 1.0 / z.shape[1]))
    rows = np.arange(y.size)

    def nll(log_t: float) -> float:
        return float(-np.mean(log_softmax(z / np.exp(log_t), axis=1)[rows, y]))

    result = minimize_scalar(
        nll, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


@dataclass(frozen=True)
class TemperatureScalingResult:
    """A fitted temperature and the test-set calibration before and after applying it.

    Attributes:
        temperature: the fitted ``T`` (``> 1`` softens overconfident models).
        before: ``{"brier", "ece", "nll"}`` of ``softmax(test_logits)``.
        after: the same for ``softmax(test_logits / T)``.
        probabilities: the calibrated ``(n, C)`` test probabilities.
    """

    temperature: float
    before: dict[str, float]
    after: dict[str, float]
    probabilities: FloatArray = field(repr=False)


def temperature_scale(
    val_logits: ArrayLike,
    val_y: ArrayLike,
    test_logits: ArrayLike,
    test_y: ArrayLike,
    n_bins: int = 15,
) -> TemperatureScalingResult:
    """Fit ``T`` on validation logits, apply it to test logits and report Brier, ECE and NLL."""
    temperature = fit_temperature(val_logits, val_y)
    raw = apply_temperature(test_logits, 1.0)
    scaled = apply_temperature(test_logits, temperature)
    return TemperatureScalingResult(
        temperature=temperature,
        before=calibration_metrics(test_y, raw, n_bins),
        after=calibration_metrics(test_y, scaled, n_bins),
        probabilities=scaled,
    )

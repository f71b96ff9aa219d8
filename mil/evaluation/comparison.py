"""Paired comparison of two models evaluated on the same cases.

The 2×2 table counts cases by correctness: ``a`` both correct, ``b`` only model A correct,
``c`` only model B correct, ``d`` both wrong (``table = [[a, b], [c, d]]``, rows = A correct /
wrong, columns = B correct / wrong).

* McNemar's test uses only the discordant counts ``b`` and ``c``. When ``b + c < exact_below``
  (25 by default) it is the exact two-sided binomial test of ``b ~ Binomial(b + c, 1/2)``,
  ``p = min(1, 2 * P[X <= min(b, c)])``; otherwise the chi-square test with continuity
  correction, ``(|b - c| - 1)^2 / (b + c)`` on one degree of freedom. ``b + c == 0`` gives
  ``p = 1``.
* The difference in accuracy ``acc_A - acc_B = (b - c) / n`` gets Newcombe's hybrid score
  interval for paired proportions (Newcombe 1998, method 10): Wilson score intervals
  ``(l1, u1)``, ``(l2, u2)`` for the two accuracies are combined as
  ``L = D - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)`` and
  ``U = D + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)``, where ``phi`` is the
  correlation of the table with ``ad - bc`` replaced by ``ad - bc - n/2`` when that exceeds
  ``n/2``, by 0 when it lies in ``[0, n/2]`` and kept when negative; ``phi = 0`` when a margin is
  empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import binom, chi2, norm

from .metrics import IntArray

McNemarMethod = Literal["exact-binomial", "chi-square-continuity-corrected"]


@dataclass(frozen=True)
class PairedComparison:
    """McNemar's test and the paired accuracy difference of models A and B.

    Attributes:
        table: ``[[a, b], [c, d]]`` (rows: A correct / wrong; columns: B correct / wrong).
        accuracy_a: accuracy of model A, ``(a + b) / n``.
        accuracy_b: accuracy of model B, ``(a + c) / n``.
        difference: ``accuracy_a - accuracy_b``.
        difference_low: lower bound of the Newcombe hybrid score interval.
        difference_high: upper bound.
        statistic: the continuity-corrected chi-square statistic, or ``b`` for the exact test.
        p_value: two-sided p-value.
        method: ``"exact-binomial"`` or ``"chi-square-continuity-corrected"``.
    """

    table: IntArray
    accuracy_a: float
    accuracy_b: float
    difference: float
    difference_low: float
    difference_high: float
    statistic: float
    p_value: float
    method: McNemarMethod


def correctness_table(correct_a: ArrayLike, correct_b: ArrayLike) -> IntArray:
    """The 2×2 table ``[[a, b], [c, d]]`` from two boolean per-case correctness vectors."""
    ca = np.asarray(correct_a).astype(bool)
    cb = np.asarray(correct_b).astype(bool)
    if ca.ndim != 1 or ca.shape != cb.shape or ca.size == 0:
        raise ValueError(f"correctness vectors must be non-empty and (n,): {ca.shape}, {cb.shape}")
    return np.array(
        [[np.sum(ca & cb), np.sum(ca & ~cb)], [np.sum(~ca & cb), np.sum(~ca & ~cb)]],
        dtype=np.int64,
    )


def mcnemar_test(
    table: ArrayLike, exact_below: int = 25
) -> tuple[float, float, McNemarMethod]:
    """McNemar's test on a 2×2 paired table; returns ``(statistic, p_value, method)``."""
    counts = np.asarray(table, dtype=np.int64)
    b, c = int(counts[0, 1]), int(counts[1, 0])
    discordant = b + c
    if discordant < exact_below:
        if discordant == 0:
            return float(b), 1.0, "exact-binomial"
        p_value = min(1.0, 2.0 * float(binom.cdf(min(b, c), discordant, 0.5)))
        return float(b), p_value, "exact-binomial"
    statistic = (abs(b - c) - 1.0) ** 2 / discordant
    return statistic, float(chi2.sf(statistic, df=1)), "chi-square-continuity-corrected"


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (no continuity correction) for a binomial proportion."""
    if n <= 0:
        raise ValueError("a proportion needs at least one trial")
    z = float(norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired_interval(table: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for ``p1 - p2`` from a paired 2×2 table."""
    counts = np.asarray(table, dtype=np.float64)
    a, b, c, d = counts[0, 0], counts[0, 1], counts[1, 0], counts[1, 1]
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(int(a + b), int(n), confidence)
    l2, u2 = wilson_interval(int(a + c), int(n), confidence)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    if cross > n / 2.0:
        cross -= n / 2.0
    elif cross >= 0.0:
        cross = 0.0
    phi = cross / math.sqrt(margins) if margins > 0 else 0.0
    difference = p1 - p2
    lower = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, difference - lower), min(1.0, difference + upper)


def compare_models(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    *,
    exact_below: int = 25,
    confidence: float = 0.95,
) -> PairedComparison:
    """Compare the class predictions of models A and B on the same cases.

    Args:
        y_true: ``(n,)`` true classes.
        pred_a: ``(n,)`` predicted classes of model A (e.g. argmax or thresholded).
        pred_b: ``(n,)`` predicted classes of model B.
        exact_below: use the exact binomial test when ``b + c`` is below this.
        confidence: coverage of the difference interval.

    Returns:
        The table, both accuracies, the difference with its Newcombe interval and McNemar's test.
    """
    truth = np.asarray(y_true)
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if not truth.shape == a.shape == b.shape:
        raise ValueError(f"shapes differ: y_true {truth.shape}, A {a.shape}, B {b.shape}")
    table = correctness_table(a == truth, b == truth)
    n = int(table.sum())
    statistic, p_value, method = mcnemar_test(table, exact_below)
    low, high = newcombe_paired_interval(table, confidence)
    accuracy_a = float(table[0].sum() / n)
    accuracy_b = float(table[:, 0].sum() / n)
    return PairedComparison(
        table=table,
        accuracy_a=accuracy_a,
        accuracy_b=accuracy_b,
        difference=accuracy_a - accuracy_b,
        difference_low=low,
        difference_high=high,
        statistic=statistic,
        p_value=p_value,
        method=method,
    )

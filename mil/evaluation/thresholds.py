"""Operating-point selection for binary tasks, done on validation data and frozen for testing.

A case is called positive when ``p_positive >= threshold``.

* ``"youden"``: the operating point maximising Youden's J = sensitivity + specificity - 1 over
  the distinct observed scores (among equal J the highest, most specific one). Every threshold
  between that score and the next lower observed score gives the same validation calls; the
  midpoint of that gap is returned, so test cases scoring just below the lowest validation
  positive are not lost to a threshold sitting on it (a brittle choice with well-separated
  validation scores).
* ``"sensitivity"``: the highest threshold whose validation sensitivity is at least ``target``.
  With the positive scores sorted in decreasing order ``s_1 >= s_2 >= ...`` this is ``s_k`` with
  ``k = ceil(target * n_positive)``: any higher threshold misses at least one of those ``k``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

ThresholdMethod = Literal["youden", "sensitivity"]


def choose_threshold(
    y_true: ArrayLike,
    p_positive: ArrayLike,
    method: ThresholdMethod = "youden",
    target: float = 0.9,
) -> float:
    """Pick a decision threshold on validation data.

    Args:
        y_true: ``(n,)`` binary labels (1 = positive).
        p_positive: ``(n,)`` positive-class probabilities (or any score).
        method: ``"youden"`` or ``"sensitivity"`` (see the module docstring).
        target: the required sensitivity for ``method="sensitivity"``, in ``(0, 1]``.

    Returns:
        The threshold: an observed score for ``"sensitivity"``, the midpoint of the optimal gap
        for ``"youden"``.

    Raises:
        ValueError: unless both classes are present, on mismatched shapes, labels other than
            0/1, an unknown method or a target outside ``(0, 1]``.
    """
    y = np.asarray(y_true)
    p = np.asarray(p_positive, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"y_true {y.shape} and p_positive {p.shape} must both be (n,)")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("choose_threshold needs binary labels 0/1")
    positive = y == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("choosing a threshold needs both positive and negative cases")
    if method == "sensitivity":
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
        scores = np.sort(p[positive])[::-1]
        k = max(1, math.ceil(target * n_pos - 1e-9))
        return float(scores[k - 1])
    if method == "youden":
        candidates = np.unique(p)[::-1]
        below_pos = np.searchsorted(np.sort(p[positive]), candidates, side="left")
        below_neg = np.searchsorted(np.sort(p[~positive]), candidates, side="left")
        sensitivity = (n_pos - below_pos) / n_pos
        specificity = below_neg / n_neg
        j = sensitivity + specificity - 1.0
        best = int(np.argmax(j))
        if best + 1 < len(candidates):
            return float((candidates[best] + candidates[best + 1]) / 2.0)
        return float(candidates[best])
    raise ValueError(f"unknown threshold method {method!r}; use 'youden' or 'sensitivity'")

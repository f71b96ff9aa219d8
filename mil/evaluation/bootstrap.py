"""Patient-level (cluster) bootstrap confidence intervals.

Slides of one patient are correlated, so resampling slides as if independent understates the
uncertainty. Each resample therefore draws as many patients as there are, with replacement, and
takes *all* slides of every drawn patient (a patient drawn twice contributes their slides twice).
Without ``groups`` every slide is its own patient (an ordinary case bootstrap).

Intervals are percentile intervals of the resampled metric values. A resample in which a metric is
undefined (``nan``, e.g. an AUC with one class only) is skipped for that metric; the number of
resamples actually used is reported per metric as ``MetricWithCI.n_bootstrap``. Percentile
intervals inherit the bias of a statistic under resampling: the binned ECE grows on resamples
(duplicated cases add binning noise), so its interval can lie above the point estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from .metrics import IntArray


@dataclass(frozen=True)
class MetricWithCI:
    """A point estimate with its bootstrap percentile interval.

    Attributes:
        value: the metric on all cases.
        low: lower interval bound (``nan`` when no resample defined the metric).
        high: upper interval bound.
        n_bootstrap: resamples in which the metric was defined and that form the interval.
    """

    value: float
    low: float
    high: float
    n_bootstrap: int

    def __str__(self) -> str:
        """``value (low–high)`` with three decimals."""
        return f"{self.value:.3f} ({self.low:.3f}–{self.high:.3f})"


def bootstrap_resamples(
    n: int, groups: ArrayLike | None = None, *, n_bootstrap: int = 1000, seed: int = 0
) -> Iterator[IntArray]:
    """Yield ``n_bootstrap`` row-index arrays, each a resample of whole groups.

    Args:
        n: number of rows (slides).
        groups: ``(n,)`` group (patient) id per row; ``None`` makes each row its own group.
        n_bootstrap: number of resamples.
        seed: seed of the ``numpy`` generator; equal seeds give equal resamples.

    Yields:
        Row indices: for each of ``G`` draws (``G`` = number of groups) all rows of the drawn
        group, so resamples vary in length when groups differ in size.
    """
    if n < 1:
        raise ValueError("nothing to resample")
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_bootstrap):
            yield rng.integers(0, n, size=n)
        return
    ids = np.asarray(groups)
    if ids.shape != (n,):
        raise ValueError(f"groups has shape {ids.shape}, expected ({n},)")
    _, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    starts = np.cumsum(sizes) - sizes
    n_groups = sizes.size
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, n_groups, size=n_groups)
        lengths = sizes[drawn]
        shift = starts[drawn] - (np.cumsum(lengths) - lengths)
        yield order[np.repeat(shift, lengths) + np.arange(int(lengths.sum()))]


def bootstrap_confidence_intervals(
    metric_fn: Callable[[IntArray], Mapping[str, float]],
    n: int,
    groups: ArrayLike | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, MetricWithCI]:
    """Evaluate ``metric_fn`` on all rows and on every resample; percentile intervals.

    Args:
        metric_fn: maps row indices to ``{metric name: value}``; ``nan`` marks undefined values.
        n: number of rows.
        groups: patient id per row (see :func:`bootstrap_resamples`).
        n_bootstrap: number of resamples; 0 gives ``nan`` bounds.
        seed: resampling seed.
        confidence: interval coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.

    Returns:
        ``{metric name: MetricWithCI}`` in the order ``metric_fn`` returns them.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 0:
        raise ValueError("n_bootstrap must be non-negative")
    point = dict(metric_fn(np.arange(n)))
    draws = np.full((n_bootstrap, len(point)), np.nan)
    resamples = bootstrap_resamples(n, groups, n_bootstrap=n_bootstrap, seed=seed)
    for b, rows in enumerate(resamples):
        values = metric_fn(rows)
        draws[b] = [values.get(name, np.nan) for name in point]
    tail = 100.0 * (1.0 - confidence) / 2.0
    out: dict[str, MetricWithCI] = {}
    for column, (name, value) in enumerate(point.items()):
        defined = draws[np.isfinite(draws[:, column]), column]
        if defined.size:
            low, high = np.percentile(defined, [tail, 100.0 - tail])
        else:
            low = high = np.nan
        out[name] = MetricWithCI(float(value), float(low), float(high), int(defined.size))
    return out

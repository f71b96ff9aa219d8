"""Validation figures written as PNG files: ROC curves, reliability diagram, confusion matrix.

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot``, no global state), so they
work headless and from worker threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from .calibration import reliability_bins
from .metrics import check_predictions, class_names, confusion_matrix, roc_auc, roc_curve


def _save(figure: Figure, path: str | Path, dpi: int) -> Path:
    """Write ``figure`` as a PNG (creating the parent folder) and return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(target, format="png", dpi=dpi, bbox_inches="tight")
    return target


def plot_roc_curves(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    path: str | Path,
    label_names: Sequence[str] | None = None,
    *,
    title: str = "ROC",
    dpi: int = 120,
) -> Path:
    """ROC curve of the positive class (two classes) or one-vs-rest curve per class.

    The legend gives each curve's AUC; classes absent from ``y_true`` (or forming all of it) are
    listed with ``AUC n/a`` and no curve.
    """
    y, p = check_predictions(y_true, probabilities)
    names = class_names(p.shape[1], label_names)
    classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    figure = Figure(figsize=(5.0, 5.0))
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    for c in classes:
        auc = roc_auc(y == c, p[:, c])
        if np.isnan(auc):
            axes.plot([], [], label=f"{names[c]} (AUC n/a)")
            continue
        fpr, tpr = roc_curve(y == c, p[:, c])
        axes.plot(fpr, tpr, linewidth=1.5, label=f"{names[c]} (AUC {auc:.3f})")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity (false-positive rate)",
             ylabel="sensitivity (true-positive rate)", title=title)
    axes.set_aspect("equal")
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path, dpi)


def plot_reliability_diagram(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    path: str | Path,
    *,
    n_bins: int = 15,
    title: str = "Reliability",
    dpi: int = 120,
) -> Path:
    """Observed frequency against mean confidence per equal-width bin, ECE in the title.

    Uses the positive-class probability for two classes and the maximum probability otherwise
    (see :mod:`mil.evaluation.calibration`); a lower panel shows how many cases fall in each bin.
    """
    bins = reliability_bins(y_true, probabilities, n_bins)
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2.0
    width = bins.edges[1] - bins.edges[0]
    filled = bins.counts > 0
    figure = Figure(figsize=(5.0, 6.0))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect")
    top.bar(centres[filled], bins.frequency[filled], width=width * 0.9, alpha=0.7,
            edgecolor="black", label="observed")
    top.plot(bins.confidence[filled], bins.frequency[filled], marker="o", color="C3",
             linewidth=1, label="observed at mean confidence")
    what = "fraction positive" if bins.binary else "accuracy"
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel=what, title=f"{title} (ECE {bins.ece:.3f})")
    top.legend(loc="upper left", fontsize="small")
    bottom.bar(centres, bins.counts, width=width * 0.9, color="0.5")
    xlabel = "positive-class probability" if bins.binary else "confidence (max probability)"
    bottom.set(xlabel=xlabel, ylabel="cases")
    return _save(figure, path, dpi)


def plot_confusion_matrix(
    y_true: ArrayLike,
    probabilities: ArrayLike,
    path: str | Path,
    label_names: Sequence[str] | None = None,
    *,
    threshold: float | None = None,
    title: str = "Confusion matrix",
    dpi: int = 120,
) -> Path:
    """Counts (left) and row-normalised rates (right); rows are true, columns predicted classes.

    Predictions are the argmax, or ``p_positive >= threshold`` for two classes when a threshold
    is given. Rows of classes absent from ``y_true`` show 0 in the normalised panel.
    """
    y, p = check_predictions(y_true, probabilities)
    n_classes = p.shape[1]
    names = class_names(n_classes, label_names)
    if threshold is not None and n_classes == 2:
        y_pred = (p[:, 1] >= threshold).astype(np.int64)
    else:
        y_pred = np.argmax(p, axis=1)
    counts = confusion_matrix(y, y_pred, n_classes)
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = 2.5 + 0.5 * n_classes
    figure = Figure(figsize=(2 * side + 2.5, side), layout="constrained")
    panels = figure.subplots(1, 2)
    layout = ((panels[0], counts, "counts"), (panels[1], rates, "row-normalised"))
    for axes, values, label in layout:
        image = axes.imshow(values, cmap="Blues", vmin=0)
        figure.colorbar(image, ax=axes, shrink=0.8)
        peak = float(values.max()) if values.size else 0.0
        for i in range(n_classes):
            for j in range(n_classes):
                text = f"{values[i, j]:d}" if label == "counts" else f"{values[i, j]:.2f}"
                colour = "white" if peak > 0 and values[i, j] > peak / 2 else "black"
                axes.text(j, i, text, ha="center", va="center", color=colour, fontsize="small")
        axes.set_xticks(range(n_classes), names, rotation=45, ha="right")
        axes.set_yticks(range(n_classes), names)
        axes.set(xlabel="predicted", ylabel="true", title=f"{title} ({label})")
    return _save(figure, path, dpi)

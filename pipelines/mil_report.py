"""Evaluation and comparison of MIL runs from their out-of-fold predictions.

``evaluate_run`` reads ``RUN/predictions_oof.csv`` and writes ``RUN/metrics.json`` (per fold
and pooled, with 95 % patient-level bootstrap intervals; per subgroup; temperature scaling
before/after when configured), ``RUN/report.txt`` and the plots ``roc.png``,
``reliability.png`` and ``confusion.png``. The binary operating point of each fold was chosen
on that fold's validation cases; pooled metrics use the mean of the fold thresholds.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mil.evaluation import (
    MetricWithCI,
    compare_models,
    evaluate_predictions,
    format_metrics,
    metrics_by_group,
    plot_confusion_matrix,
    plot_reliability_diagram,
    plot_roc_curves,
    temperature_scale,
)
from mil.splits import read_label_table
from wsi.atomic import write_json_atomic, write_text_atomic

from .mil_run import MILRunConfig


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _arrays(rows: list[dict[str, str]], n_classes: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.array([int(r["label"]) for r in rows])
    probabilities = np.array([[float(r[f"prob_{i}"]) for i in range(n_classes)] for r in rows])
    patients = np.array([r["patient_id"] for r in rows])
    return labels, probabilities, patients


def _plain(results: dict[str, MetricWithCI]) -> dict[str, dict[str, float]]:
    return {name: asdict(metric) for name, metric in results.items()}


def _threshold(rows: list[dict[str, str]]) -> float | None:
    values = [float(r["threshold"]) for r in rows if r.get("threshold") not in ("", None)]
    return float(np.mean(values)) if values else None


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """Evaluate a finished run; returns what it writes to ``metrics.json``."""
    config = MILRunConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    table = read_label_table(config.labels, config.label_names)
    names, n_classes = list(table.label_names), len(table.label_names)
    rows = _read_rows(run_dir / "predictions_oof.csv")
    test = [r for r in rows if r["split"] == "test"]
    settings = {"task": config.task, "label_names": names,
                "n_bootstrap": config.evaluation.n_bootstrap}
    report: dict[str, Any] = {"cases": len(test), "folds": {}}
    for fold in sorted({int(r["fold"]) for r in test}):
        part = [r for r in test if int(r["fold"]) == fold]
        y, p, patients = _arrays(part, n_classes)
        report["folds"][fold] = _plain(evaluate_predictions(
            y, p, groups=patients, threshold=_threshold(part), **settings))
    y, p, patients = _arrays(test, n_classes)
    threshold = _threshold(test)
    pooled = evaluate_predictions(y, p, groups=patients, threshold=threshold, **settings)
    report["pooled"] = _plain(pooled)
    report["threshold"] = threshold
    report["subgroups"] = _subgroups(config, table.rows, test, y, p, patients, threshold,
                                     settings)
    if config.evaluation.temperature_scaling:
        report["temperature_scaling"] = _temperature(rows, n_classes)
    write_json_atomic(run_dir / "metrics.json", report)
    write_text_atomic(run_dir / "report.txt",
                      f"{len(test)} cases, out-of-fold test predictions, 95 % patient-level "
                      f"bootstrap CIs\n\n{format_metrics(pooled)}\n")
    plot_roc_curves(y, p, run_dir / "roc.png", names)
    plot_reliability_diagram(y, p, run_dir / "reliability.png")
    plot_confusion_matrix(y, p, run_dir / "confusion.png", names, threshold=threshold)
    return report


def _subgroups(config: MILRunConfig, table_rows: tuple[dict[str, str], ...],
               test: list[dict[str, str]], y: np.ndarray, p: np.ndarray,
               patients: np.ndarray, threshold: float | None, settings: dict[str, Any]
               ) -> dict[str, Any]:
    by_slide = {r["slide_id"]: r for r in table_rows}
    by_patient = {r["patient_id"]: r for r in table_rows}
    out: dict[str, Any] = {}
    for column in config.evaluation.subgroups:
        values = [(by_slide.get(r["case_id"]) or by_patient[r["patient_id"]]).get(column, "")
                  for r in test]
        groups = metrics_by_group(y, p, values, groups=patients, threshold=threshold,
                                  **settings)
        out[column] = {name: _plain(metrics) for name, metrics in groups.items()}
    return out


def _temperature(rows: list[dict[str, str]], n_classes: int) -> dict[str, Any]:
    val = [r for r in rows if r["split"] == "val"]
    test = [r for r in rows if r["split"] == "test"]
    val_y, val_p, _ = _arrays(val, n_classes)
    test_y, test_p, _ = _arrays(test, n_classes)
    result = temperature_scale(np.log(np.clip(val_p, 1e-12, 1)), val_y,
                               np.log(np.clip(test_p, 1e-12, 1)), test_y)
    return {"temperature": result.temperature, "before": result.before, "after": result.after}


def _predicted(rows: list[dict[str, str]], n_classes: int) -> dict[str, tuple[int, int]]:
    out = {}
    for row in rows:
        probs = [float(row[f"prob_{i}"]) for i in range(n_classes)]
        threshold = row.get("threshold")
        predicted = (int(probs[1] >= float(threshold)) if n_classes == 2 and threshold
                     else int(np.argmax(probs)))
        out[row["case_id"]] = (int(row["label"]), predicted)
    return out


def compare_runs(run_a: Path, run_b: Path) -> dict[str, Any]:
    """McNemar's test and the paired accuracy difference of two runs on their shared cases."""
    config = MILRunConfig.model_validate(json.loads((run_a / "config.json").read_text()))
    n_classes = len(read_label_table(config.labels, config.label_names).label_names)
    a = _predicted([r for r in _read_rows(run_a / "predictions_oof.csv")
                    if r["split"] == "test"], n_classes)
    b = _predicted([r for r in _read_rows(run_b / "predictions_oof.csv")
                    if r["split"] == "test"], n_classes)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError(f"{run_a} and {run_b} share no test cases")
    result = compare_models(np.array([a[c][0] for c in shared]),
                            np.array([a[c][1] for c in shared]),
                            np.array([b[c][1] for c in shared]))
    return {"cases": len(shared), **{k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                     for k, v in asdict(result).items()}}

"""The MIL commands of the ``slidepipe`` CLI: train, evaluate, predict, compare.

Registered on the main application in :mod:`pipelines.cli`; they share its exit codes and
one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mil.train import EpochLog

from .cli_common import console, fatal
from .config import ConfigError
from .feature_store import FeatureStoreError
from .mil_report import compare_runs, evaluate_run
from .mil_run import load_mil_config, predict_slides, train_run


def train(
    config_file: Annotated[Path, typer.Argument(help="MIL YAML config (labels, features, …)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder")],
    model: Annotated[str | None, typer.Option(help="abmil, gated_abmil, clam_sb, clam_mb, "
                                                   "transmil, mean_pool, max_pool")] = None,
) -> None:
    """Train with patient-level cross-validation, then evaluate the out-of-fold predictions."""
    try:
        config = load_mil_config(config_file)
        if model is not None:
            config = config.model_copy(update={
                "train": config.train.model_copy(update={"model": model})})

        def on_epoch(fold: int, row: EpochLog) -> None:
            marker = " *" if row.best else ""
            console.print(f"fold {fold} epoch {row.epoch:3d}  train {row.train_loss:.4f}  "
                          f"val {row.val_loss:.4f}  auc {row.val_auc:.3f}{marker}")

        train_run(config, out, on_epoch)
        report = evaluate_run(out)
    except (ConfigError, FeatureStoreError, ValueError, OSError) as error:
        raise fatal(error) from error
    console.print((out / "report.txt").read_text())
    console.print(f"run folder: {out} ({report['cases']} cases)")


def evaluate(run_dir: Annotated[Path, typer.Argument(help="a run folder made by train")]
             ) -> None:
    """Recompute metrics, confidence intervals and plots of a run."""
    try:
        evaluate_run(run_dir)
    except (ConfigError, ValueError, OSError, KeyError) as error:
        raise fatal(error) from error
    console.print((run_dir / "report.txt").read_text())


def predict(
    model: Annotated[list[Path], typer.Option(help="a run folder (all folds) or model.pt")],
    features: Annotated[Path, typer.Option(help="the output folder of slidepipe extract")],
    slides: Annotated[list[str], typer.Argument(help="slide ids to predict")],
    out: Annotated[Path, typer.Option("--out", "-o", help="predictions CSV")],
) -> None:
    """Apply a model (or the ensemble of a run's fold models) to feature stores; write the
    predictions and each slide's attention into its store, ready for heatmaps."""
    try:
        predict_slides(model, features, slides, out)
    except (ConfigError, FeatureStoreError, ValueError, OSError) as error:
        raise fatal(error) from error
    console.print(f"predictions: {out}")


def compare(run_a: Annotated[Path, typer.Argument(help="first run folder")],
            run_b: Annotated[Path, typer.Argument(help="second run folder")]) -> None:
    """McNemar's test and the paired accuracy difference of two runs on shared cases."""
    try:
        result = compare_runs(run_a, run_b)
    except (ValueError, OSError, KeyError) as error:
        raise fatal(error) from error
    typer.echo(json.dumps(result, indent=2))

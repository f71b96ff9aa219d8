"""``slidepipe demo``: the whole pipeline on a synthetic cohort (README's first command)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .backbones import BackboneError
from .cli_common import console, fatal, log_to
from .config import ConfigError
from .demo import DEMO_FOLDS, DEMO_SIZE, DEMO_SLIDES, DemoResult, run_demo


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("demo-output"),
    slides: Annotated[int, typer.Option(min=6, help="number of slides (half positive)")
                      ] = DEMO_SLIDES,
    size: Annotated[int, typer.Option(min=1024, help="slide width and height, px")] = DEMO_SIZE,
    folds: Annotated[int, typer.Option(min=3, help="cross-validation folds")] = DEMO_FOLDS,
) -> None:
    """Generate a synthetic cohort of pyramidal H&E-like slides (half with lesions) and take it
    through the whole pipeline with the embedded defaults: slidepipe run (tissue, patch grids,
    EfficientNet-Lite0 features on a Dask LocalCluster), ABMIL trained with patient-level
    cross-validation, predictions, heatmaps, the HTML worklist and the run report; then print
    the out-of-fold metrics and how well attention finds the known lesions."""
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_to(out / "slidepipe.log") as log_path:
        try:
            result = run_demo(out, slides, size, folds=folds, say=_say)
        except (ConfigError, BackboneError, OSError, RuntimeError, ValueError) as error:
            raise fatal(error) from error
    _print_results(result, out)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; log: {log_path}")
    raise typer.Exit(result.run.exit_code)


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False)


def _print_results(result: DemoResult, out: Path) -> None:
    report = (result.model_dir / "report.txt").read_text()
    console.print(f"\n[bold]ABMIL, out-of-fold[/] ({result.model_dir}):\n{report}",
                  highlight=False)
    table = Table("slide", "lesion patches", "patch AUC", "top-patch hit rate",
                  "heatmap region IoU", title="attention vs the known lesions "
                  "(attention of the fold model that held the slide out)")
    for row in result.overlaps:
        table.add_row(row.slide_id, str(row.lesion_patches), f"{row.patch_auc:.3f}",
                      f"{row.top_hit_rate:.2f}",
                      "-" if row.region_iou is None else f"{row.region_iou:.2f}")
    if result.overlaps:
        aucs = [r.patch_auc for r in result.overlaps if not math.isnan(r.patch_auc)]
        ious = [r.region_iou for r in result.overlaps if r.region_iou is not None]
        table.add_row("mean", "", f"{sum(aucs) / max(len(aucs), 1):.3f}",
                      f"{sum(r.top_hit_rate for r in result.overlaps) / len(result.overlaps):.2f}",
                      f"{sum(ious) / len(ious):.2f}" if ious else "-", style="bold")
    console.print(table)
    run = out / "run"
    worklists = sorted((run / "worklists").glob("run-*/index.html"))
    console.print(f"open: {worklists[-1] if worklists else run / 'worklists'} (triage worklist "
                  f"with deep-zoom heatmaps), {run / 'report.html'} (run report), "
                  f"{run / 'heatmaps'}/<slide>/ (overlay PNG, QuPath GeoJSON and TIFF), "
                  f"{result.model_dir}/roc.png")
    console.print(result.run.summary, markup=False, highlight=False)

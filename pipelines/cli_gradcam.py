"""The ``slidepipe gradcam`` command: Grad-CAM inside the top-k patches of slides.

Registered on the main application in :mod:`pipelines.cli`; it shares its exit codes (0 all
slides done, 2 some slides failed, 1 fatal) and one-line errors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

import wsi

from .backbones import Backbone, BackboneError
from .cli_common import EXIT_SLIDES_FAILED, console, fatal, log_to
from .config import ConfigError
from .discovery import ManifestError, discover_slides
from .explain import ExplanationError, ModelEnsemble, open_slide_context
from .feature_store import FeatureStoreError
from .gradcam import NotACnnError, explain_slide
from .mil_run import store_path
from .tile import write_csv_atomic

log = logging.getLogger(__name__)

SUMMARY_NAME = "gradcam_summary.csv"


def gradcam(
    model: Annotated[list[Path], typer.Option(help="a run folder (all folds) or model.pt")],
    features: Annotated[Path, typer.Option(help="the output folder of slidepipe extract")],
    slides: Annotated[list[Path], typer.Argument(
        help="slide files, folders (searched recursively) or manifest CSVs, as for tile")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    top_k: Annotated[int, typer.Option(min=1, help="patches explained per slide, by "
                                                   "attention")] = 8,
    class_name: Annotated[str | None, typer.Option(
        "--class", help="class to explain (default: each slide's predicted class)")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda[:N]")
                      ] = "auto",
) -> None:
    """Grad-CAM of the top-k attended patches of each slide: which pixels drove its score.

    Writes OUT/<slide_id>/ (per patch a PNG of the patch beside its CAM overlay and the CAM as
    .npy, plus index.json) and OUT/gradcam_summary.csv. Needs a CNN backbone's features.
    """
    try:
        entries = discover_slides(slides)
        if not entries:
            raise ConfigError(f"no slides found in {', '.join(map(str, slides))}")
        models = ModelEnsemble.load(model, device)
        if class_name is not None:
            models.class_index(class_name)
        out.mkdir(parents=True, exist_ok=True)
    except (ConfigError, ManifestError, ExplanationError, ValueError, OSError, KeyError
            ) as error:
        raise fatal(error) from error
    backbone_name = models.metadata[0]["feature_provenance"]["backbone"]
    backbones: dict[str, Backbone] = {}
    rows: list[dict[str, Any]] = []
    with log_to(out / "slidepipe.log"):
        for entry in entries:
            row = {"slide_id": entry.slide_id, "status": "failed", "folder": "", "error": ""}
            try:
                with open_slide_context(store_path(features, backbone_name, entry.slide_id),
                                        entry.path, entry.slide_id) as context:
                    folder = explain_slide(context, models, out, top_k=top_k,
                                           class_name=class_name, backbones=backbones)
                row.update(status="ok", folder=str(folder))
                console.print(f"{entry.slide_id}: {folder}")
            except (NotACnnError, BackboneError) as error:
                log.exception("%s: cannot run Grad-CAM", entry.path)
                raise fatal(error) from error
            except (ExplanationError, FeatureStoreError, wsi.SlideError, OSError,
                    ValueError) as error:
                row["error"] = str(error)
                log.error("%s: %s", entry.path, error, exc_info=True)
                console.print(f"[red]{entry.slide_id}: {error}")
            except Exception as error:  # one broken slide must not stop the others
                row["error"] = f"unexpected {type(error).__name__}: {error}"
                log.exception("%s: unexpected failure", entry.path)
                console.print(f"[red]{entry.slide_id}: {row['error']}")
            rows.append(row)
    write_csv_atomic(out / SUMMARY_NAME, rows)
    failed = sum(r["status"] != "ok" for r in rows)
    console.print(f"Grad-CAM: {len(rows) - failed} of {len(rows)} slides in {out}")
    if failed:
        raise typer.Exit(EXIT_SLIDES_FAILED)

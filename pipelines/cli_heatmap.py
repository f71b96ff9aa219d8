"""``slidepipe heatmap``: heatmap exports of predicted slides from their stored attention.

Per slide ``OUT/<slide>/`` (see :mod:`pipelines.heatmaps.run`), then, unless ``--no-html``, the
static HTML worklist of the exported slides in ``OUT/worklist/`` (``index.html``, highest risk
first, and a deep-zoom viewer page per slide with its heatmap as a layer; see
:mod:`pipelines.heatmaps.worklist`). The per-slide exports are written first, so a failing HTML
step loses none of them. Registered on the main application in :mod:`pipelines.cli`; it shares
its exit codes and one-line errors (0 every slide exported, 2 some slides failed, 1 fatal,
including an HTML export that could not be written).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .cli_common import EXIT_FATAL, EXIT_OK, EXIT_SLIDES_FAILED, console, fatal, log_to
from .discovery import ManifestError, SlideEntry, discover_slides
from .heatmaps import (
    SUMMARY_CSV,
    HeatmapInputError,
    HeatmapResult,
    HeatmapSettings,
    HeatmapSettingsError,
    PseudonymError,
    export_heatmaps,
    load_heatmap_settings,
)
from .heatmaps.pseudonyms import default_mapping_path
from .heatmaps.worklist import WORKLIST_DIR, write_heatmap_worklist
from .tile import describe_error


def _report(result: HeatmapResult) -> None:
    if result.status == "ok":
        console.print(f"[green]ok[/] {escape(result.slide)}: {result.patches} patches, "
                      f"{result.regions} regions ({result.region_area_mm2:.3f} mm²), "
                      f"{result.seconds:.1f} s")
    else:
        console.print(f"[red]failed[/] {escape(result.slide)}: {escape(result.error)}")


def heatmap(
    slides: Annotated[list[Path], typer.Argument(
        help="slides, folders (recursive), manifest CSVs")],
    predictions: Annotated[Path, typer.Option(help="predictions CSV of slidepipe predict")],
    features: Annotated[Path, typer.Option(help="the output folder of slidepipe extract")],
    out: Annotated[Path, typer.Option("--out", "-o", help="export folder")],
    config_file: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config; its heatmap: section is used")] = None,
    threshold: Annotated[float | None, typer.Option(
        help="normalised score outlined as a region (default 0.65)")] = None,
    colormap: Annotated[str | None, typer.Option(
        help="viridis (default), magma, inferno, plasma or cividis")] = None,
    normalise: Annotated[str | None, typer.Option(
        help="per-slide normalisation: percentile (default), rank or absolute")] = None,
    smooth: Annotated[float | None, typer.Option(
        help="Gaussian smoothing of the overlay, sigma in µm (default 0: none)")] = None,
    output_mpp: Annotated[float | None, typer.Option(
        help="µm/px of the overlay (default: the slide fitted into 2048 px)")] = None,
    top_k: Annotated[int | None, typer.Option(help="patches in the gallery (default 16)")
                     ] = None,
    pseudonymise: Annotated[bool, typer.Option(
        "--pseudonymise", help="replace slide names by stable keyed-hash pseudonyms")] = False,
    pseudonym_map: Annotated[Path | None, typer.Option(
        help="CSV slide_id → pseudonym, outside OUT (default: OUT-pseudonyms.csv beside it)")
                             ] = None,
    pseudonym_key: Annotated[Path | None, typer.Option(
        help="secret key file of the pseudonyms, created when missing (default: beside the "
             "mapping)")] = None,
    backend: Annotated[str, typer.Option(help="auto, openslide or tiffslide")] = "auto",
    html: Annotated[bool, typer.Option(
        "--html/--no-html", help=f"also write the HTML worklist with deep-zoom viewers into "
                                 f"OUT/{WORKLIST_DIR}/ (default: on)")] = True,
) -> None:
    """Overlay PNG, pyramidal TIFF (QuPath), QuPath GeoJSON, top-k patch gallery and a JSON
    summary per slide, from the attention slidepipe predict stored; no model is run. Then
    (unless --no-html) a static HTML worklist of the exported slides, highest risk first, each
    in a deep-zoom viewer with its heatmap as a layer: open OUT/worklist/index.html in a
    browser, no server needed. Exit code 2 when any slide failed, 1 when the HTML export
    could not be written (the per-slide exports are kept)."""
    try:
        settings = load_heatmap_settings(config_file, {
            "threshold": threshold, "colormap": colormap, "normalise": normalise,
            "smooth_um": smooth, "output_mpp": output_mpp, "top_k": top_k,
            "pseudonymise": pseudonymise or None, "pseudonym_map": pseudonym_map,
            "pseudonym_key": pseudonym_key})
        entries = discover_slides(slides)
        out.mkdir(parents=True, exist_ok=True)
    except (HeatmapSettingsError, ManifestError, OSError) as error:
        raise fatal(error) from error
    if not entries:
        raise fatal("no slides found in " + ", ".join(map(str, slides)))
    # with pseudonyms the log (it names slide files) stays outside the export folder
    log_path = (default_mapping_path(out).with_name(f"{out.resolve().name}-heatmap.log")
                if settings.pseudonymise else out / "slidepipe.log")
    with log_to(log_path):
        try:
            results = export_heatmaps(entries, predictions, features, out, settings,
                                      backend=backend, on_slide=_report)
        except (HeatmapInputError, PseudonymError, OSError) as error:
            raise fatal(error) from error
        failed = sum(r.status == "failed" for r in results)
        console.print(f"{len(results)} slides: {len(results) - failed} exported, {failed} "
                      f"failed; summary: {out / SUMMARY_CSV}")
        if failed:
            console.print(f"details of the failures: {log_path}")
        html_ok = not html or _write_html(out, entries, results, predictions, features,
                                          settings, log_path)
    if not html_ok:
        raise typer.Exit(EXIT_FATAL)
    raise typer.Exit(EXIT_SLIDES_FAILED if failed else EXIT_OK)


def _write_html(out: Path, entries: list[SlideEntry], results: list[HeatmapResult],
                predictions: Path, features: Path, settings: HeatmapSettings,
                log_path: Path) -> bool:
    """The HTML worklist after the per-slide exports; False (reported) when it failed."""
    try:
        index = write_heatmap_worklist(out, entries, results, predictions, features, settings)
    except Exception as error:  # the per-slide exports are written and stay
        logging.getLogger(__name__).exception("the HTML export could not be written")
        # with pseudonyms the message may name a slide; the log (outside OUT) has it
        reason = "" if settings.pseudonymise else f": {escape(describe_error(error))}"
        console.print(f"[bold red]error:[/] the HTML export could not be written{reason}; "
                      f"the per-slide exports are kept (details: {log_path})")
        return False
    if index is None:
        console.print("no slide exported: no HTML worklist written")
    else:
        console.print(f"HTML worklist: {index}")
    return True

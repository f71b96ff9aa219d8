"""The ``slidepipe`` command line: a thin layer over the same functions the library exposes.

Exit codes: 0 all slides done, 2 finished but some slides failed, 1 fatal (bad config, no
slides, unwritable output). Errors print as one line; tracebacks go to the run log.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import wsi

from . import __version__, cli_demo, cli_gradcam, cli_heatmap, cli_mil, cli_radiology, cli_run
from .backbones import BackboneError
from .cli_common import EXIT_OK, EXIT_SLIDES_FAILED, console, fatal, log_to
from .config import ConfigError, SlidepipeConfig, load_config
from .discovery import ArchiveInputs, ManifestError, SlideEntry, discover_inputs, discover_slides
from .extract import ExtractResult, backbone_tag, extract_archive
from .feature_store import FeatureStoreError, import_h5
from .heatmaps.pseudonyms import PseudonymError
from .radiology import RadiologyError, StudyKeys, discover_studies, load_radiology_config
from .tile import TileResult, tile_slide, write_csv_atomic, write_summary

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="slidepipe: whole-slide images to tissue grids, features, grades and "
                       "heatmaps.")


def _run_log(out_dir: Path) -> AbstractContextManager[Path]:
    """The run log of every slidepipe command: OUT/slidepipe.log."""
    return log_to(out_dir / "slidepipe.log")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[now]}"),
                    console=console, transient=False)


@app.command()
def version() -> None:
    """Print the slidepipe version."""
    typer.echo(__version__)


@app.command()
def info(
    slides: Annotated[list[Path], typer.Argument(help="slide files or folders")],
    backend: Annotated[str, typer.Option(help="auto, openslide or tiffslide")] = "auto",
    show_phi: Annotated[bool, typer.Option(
        "--show-phi", help="also show identifying fields and associated images")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Print slide metadata. Identifying fields (label/macro images, scanner user, file name,
    dates) stay hidden unless --show-phi."""
    try:
        entries = discover_slides(slides)
    except (ManifestError, OSError) as error:
        raise fatal(str(error)) from error
    records, failed = [], 0
    for entry in entries:
        try:
            with wsi.open_slide(entry.path, backend) as slide:
                record = slide.summary() | {"slide_id": entry.slide_id,
                                            "content_hash": slide.content_hash}
                if show_phi:
                    record["associated_images"] = list(slide.associated_names)
                    record["properties"] = slide.properties(show_phi=True)
        except wsi.SlideError as error:
            failed += 1
            record = {"slide_id": entry.slide_id, "path": str(entry.path), "error": error.message}
        records.append(record)
    if as_json:
        typer.echo(json.dumps(records, indent=2, default=str))
    else:
        table = Table(title="slides")
        for column in ("slide", "backend", "vendor", "size", "levels", "µm/px", "objective",
                       "hash / error"):
            table.add_column(column)
        for r in records:
            if "error" in r:
                table.add_row(r["slide_id"], "", "", "", "", "", "", f"[red]{r['error']}")
                continue
            mpp = f"{r['mpp_x']:.4g}" if r["mpp_x"] else "[yellow]missing"
            table.add_row(r["slide_id"], r["backend"], r["vendor"],
                          f"{r['width']}x{r['height']}", str(r["levels"]), mpp,
                          str(r["objective_power"] or ""), r["content_hash"])
        Console().print(table)
        if show_phi:
            for r in records:
                if "properties" in r:
                    Console().print(f"[bold]{r['slide_id']}[/] associated images: "
                                    f"{', '.join(r['associated_images']) or 'none'}")
                    for key, value in r["properties"].items():
                        Console().print(f"  {key} = {value}", markup=False)
    raise typer.Exit(EXIT_SLIDES_FAILED if failed else EXIT_OK)


def run_tiling(inputs: list[Path], out: Path, config: SlidepipeConfig) -> list[TileResult]:
    """Tile every slide found in ``inputs`` into ``out`` with a progress bar; write
    ``out/summary.csv``. Returns the per-slide results."""
    try:
        entries = discover_slides(inputs)
    except (ManifestError, OSError) as error:
        raise fatal(str(error)) from error
    if not entries:
        raise fatal("no slides found in " + ", ".join(map(str, inputs)))
    overrides = (wsi.load_mpp_overrides(config.slides.mpp_overrides)
                 if config.slides.mpp_overrides else None)
    results: list[TileResult] = []
    with _progress() as progress:
        task = progress.add_task("tiling", total=len(entries), now="")
        for entry in entries:
            progress.update(task, now=entry.slide_id)
            result = tile_slide(entry, config, out, overrides)
            if result.status == "failed":
                progress.console.print(f"[red]failed[/] {entry.slide_id}: {result.error}")
            elif result.status == "no_tissue":
                progress.console.print(f"[yellow]no tissue[/] {entry.slide_id}: {result.error}")
            results.append(result)
            progress.advance(task)
        progress.update(task, now="")
    write_summary(results, out)
    return results


def _print_tiling_summary(results: list[TileResult], out: Path) -> int:
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "no_tissue", "failed")}
    patches = sum(r.patches for r in results)
    console.print(f"{len(results)} slides: {counts['ok']} tiled ({patches} patches), "
                  f"{counts['no_tissue']} without tissue, {counts['failed']} failed; "
                  f"summary: {out / 'summary.csv'}")
    return EXIT_SLIDES_FAILED if counts["failed"] else EXIT_OK


@app.command()
def tile(
    paths: Annotated[list[Path], typer.Argument(help="slides, folders (recursive), manifest CSVs")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config")] = None,
    target_mpp: Annotated[float | None, typer.Option(help="patch µm/px (0.5 ≈ 20x)")] = None,
    magnification: Annotated[float | None, typer.Option(help="alias: 20 → 0.5 µm/px")] = None,
    patch_size: Annotated[int | None, typer.Option(help="patch size in px")] = None,
    overlap: Annotated[int | None, typer.Option(help="overlap in px")] = None,
    min_tissue: Annotated[float | None, typer.Option(help="min tissue fraction per patch")] = None,
    mpp: Annotated[float | None, typer.Option(help="µm/px for slides lacking it")] = None,
    mpp_overrides: Annotated[Path | None, typer.Option(help="CSV slide,mpp")] = None,
    backend: Annotated[str | None, typer.Option(help="auto, openslide or tiffslide")] = None,
    qc: Annotated[bool | None, typer.Option("--qc/--no-qc", help="pixel QC per patch")] = None,
) -> None:
    """Find tissue and lay a patch grid on every slide; write grids, masks, overviews and a
    summary CSV. Exit code 2 when any slide failed."""
    try:
        config = load_config(config_file, {
            "tiling": {"target_mpp": target_mpp, "magnification": magnification,
                       "patch_size": patch_size, "overlap": overlap,
                       "min_tissue_fraction": min_tissue},
            "slides": {"mpp": mpp, "mpp_overrides": mpp_overrides, "backend": backend},
            "qc": {"enabled": qc},
        })
        out.mkdir(parents=True, exist_ok=True)
    except (ConfigError, OSError) as error:
        raise fatal(str(error)) from error
    with _run_log(out) as log_path:
        results = run_tiling(paths, out, config)
    code = _print_tiling_summary(results, out)
    if code:
        console.print(f"details of the failures: {log_path}")
    raise typer.Exit(code)


@app.command()
def extract(
    paths: Annotated[list[Path], typer.Argument(
        help="slides, radiology studies (DICOM, NIfTI), folders (recursive), manifest CSVs")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config")] = None,
    modality: Annotated[str, typer.Option(
        help="auto (tell slides from DICOM/NIfTI studies), wsi (all slides), or ct, mr, cr, "
             "dx, us (all radiology studies of that modality)")] = "auto",
    backbone: Annotated[str | None, typer.Option(
        help="efficientnet_lite0 (embedded), resnet50_trunc, a timm name, hf-hub:ORG/NAME")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="local weights for the backbone")] = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="random initialisation (for quick checks only)")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1…")] = None,
    batch_size: Annotated[int | None, typer.Option(help="patches per forward pass")] = None,
    target_mpp: Annotated[float | None, typer.Option(help="patch µm/px (0.5 ≈ 20x)")] = None,
    patch_size: Annotated[int | None, typer.Option(help="patch size in px")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="existing Dask scheduler, tcp://HOST:PORT (default: a LocalCluster)")] = None,
    workers: Annotated[int | None, typer.Option(help="LocalCluster worker processes")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="recompute finished slides")
                         ] = False,
) -> None:
    """Tile where no grid exists yet, then turn every patch into a feature vector with a
    pretrained backbone on a Dask cluster; write zarr stores (and CLAM/TRIDENT HDF5), a
    summary CSV and a patches/s line. Radiology studies become bags of slices or patches with
    the default radiology settings (``slidepipe radiology extract`` takes the others) and go to
    the same OUT/<study_id>/features_<backbone>.zarr layout. Exit code 2 when any failed."""
    try:
        config = load_config(config_file, {
            "backbone": {"name": backbone, "checkpoint": checkpoint, "device": device,
                         "batch_size": batch_size,
                         "pretrained": False if random_weights else None},
            "tiling": {"target_mpp": target_mpp, "patch_size": patch_size},
            "cluster": {"scheduler": scheduler, "workers": workers},
            "extraction": {"overwrite": overwrite or None},
        })
        out.mkdir(parents=True, exist_ok=True)
        found = discover_inputs(paths, modality)
    except (ConfigError, ManifestError, OSError) as error:
        raise fatal(str(error)) from error
    if not found.slides and not found.studies:
        raise fatal("no slides or studies found in " + ", ".join(map(str, paths)))
    code = EXIT_OK
    if found.slides:
        with _run_log(out) as log_path:
            try:
                results = run_extraction(found.slides, config, out)
            except BackboneError as error:
                raise fatal(str(error)) from error
        code = _print_extraction_summary(results, out)
        if code:
            console.print(f"details of the failures: {log_path}")
    if found.studies:
        code = max(code, _extract_studies(found, config, out))
    raise typer.Exit(code)


def _extract_studies(found: ArchiveInputs, config: SlidepipeConfig, out: Path) -> int:
    """The radiology inputs of ``slidepipe extract``, with its backbone and cluster."""
    try:
        radiology = load_radiology_config(None, {
            "modality": found.radiology_modality,
            "backbone": config.backbone.model_dump(mode="json"),
            "cluster": config.cluster.model_dump(mode="json")})
        keys = StudyKeys.for_output(out)
        studies = discover_studies(found.studies)
    except (ConfigError, PseudonymError, RadiologyError, OSError) as error:
        raise fatal(str(error)) from error
    return cli_radiology.run_radiology_extraction(studies, radiology, out, keys,
                                                  config.extraction.overwrite)


def run_extraction(entries: list[SlideEntry], config: SlidepipeConfig, out: Path
                   ) -> list[ExtractResult]:
    """Extract features with per-slide and overall progress bars; writes
    ``out/extract_summary.csv``."""
    overrides = (wsi.load_mpp_overrides(config.slides.mpp_overrides)
                 if config.slides.mpp_overrides else None)
    start = time.perf_counter()
    with _progress() as progress:
        overall = progress.add_task("patches", total=None, now="")
        tasks: dict[str, TaskID] = {}
        done: dict[str, int] = {}

        def on_progress(slide_id: str, patches_done: int, patches_total: int) -> None:
            if slide_id not in tasks:
                tasks[slide_id] = progress.add_task(slide_id, total=patches_total, now="")
            progress.update(tasks[slide_id], completed=patches_done)
            done[slide_id] = patches_done
            elapsed = time.perf_counter() - start
            total = sum(done.values())
            progress.update(overall, completed=total, now=f"{total / elapsed:.1f} patches/s")

        results = extract_archive(entries, config, out, overrides, on_progress,
                                  announce=progress.console.print)
    write_csv_atomic(out / "extract_summary.csv", [asdict(r) for r in results])
    return results


def _print_extraction_summary(results: list[ExtractResult], out: Path) -> int:
    counts = {s: sum(r.status == s for r in results)
              for s in ("ok", "cached", "no_tissue", "failed")}
    computed = [r for r in results if r.status == "ok"]
    patches = sum(r.patches for r in computed)
    seconds = sum(r.seconds for r in computed)
    rate = f"{patches / seconds:.1f} patches/s" if seconds else "no patches computed"
    console.print(f"{len(results)} slides: {counts['ok']} extracted ({patches} patches, {rate}), "
                  f"{counts['cached']} already done, {counts['no_tissue']} without tissue, "
                  f"{counts['failed']} failed; summary: {out / 'extract_summary.csv'}")
    for r in results:
        if r.status == "failed":
            console.print(f"[red]failed[/] {r.slide_id}: {r.error}")
    return EXIT_SLIDES_FAILED if counts["failed"] else EXIT_OK


@app.command("import-features")
def import_features(
    files: Annotated[list[Path], typer.Argument(help="CLAM/TRIDENT .h5 feature files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    backbone: Annotated[str, typer.Option(help="the backbone that made the features")],
) -> None:
    """Bring existing CLAM/TRIDENT feature files (datasets features and coords) into
    slidepipe feature stores, OUT/<slide>/features_<backbone>.zarr, for the MIL stages."""
    failed = 0
    for file in files:
        store = out / file.stem / f"features_{backbone_tag(backbone)}.zarr"
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            imported = import_h5(file, store, backbone=backbone)
            console.print(f"{file.stem}: {len(imported)} patches x {imported.feature_dim} "
                          f"→ {store}")
        except (FeatureStoreError, OSError) as error:
            failed += 1
            console.print(f"[red]failed[/] {file}: {error}")
    raise typer.Exit(EXIT_SLIDES_FAILED if failed else EXIT_OK)


app.command()(cli_mil.train)
app.command()(cli_mil.evaluate)
app.command()(cli_mil.predict)
app.command()(cli_mil.compare)
app.command()(cli_heatmap.heatmap)
app.command()(cli_gradcam.gradcam)
app.command()(cli_run.run)
app.command()(cli_run.status)
app.command()(cli_demo.demo)
app.add_typer(cli_radiology.app, name="radiology")

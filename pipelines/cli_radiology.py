"""``slidepipe radiology``: DICOM and NIfTI studies through the slide pipeline.

``extract`` turns studies into feature stores that ``slidepipe train`` / ``predict`` read as
they read slides (``slidepipe extract`` runs the same code with the default radiology
settings; this command adds the radiology YAML, window, spacing and key file); ``heatmap``
exports attention plots, overlays and NIfTI maps of predicted studies; ``deidentify`` writes
de-identified copies of DICOM files. Exit codes as everywhere: 0 all done, 2 finished but some
studies failed, 1 fatal.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from wsi.atomic import write_text_atomic

from .backbones import BackboneError
from .cli_common import EXIT_OK, EXIT_SLIDES_FAILED, console, fatal, log_to
from .config import ConfigError
from .extract_worker import store_path
from .feature_store import FeatureStoreError, open_features
from .heatmaps.pseudonyms import PseudonymError
from .radiology import (
    RadiologyConfig,
    RadiologyError,
    StudyInput,
    StudyKeys,
    StudyResult,
    deidentify_file,
    discover_studies,
    extract_studies,
    find_dicom_studies,
    load_radiology_config,
    read_study,
)
from .radiology.dicom import read_header
from .radiology.exports import export_study, study_attention
from .tile import write_csv_atomic

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Radiology studies (DICOM CT/MR/CR/DX/US, NIfTI) as bags of instances: "
                       "features, heatmaps, de-identified copies.")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="radiology YAML")]
KeyOption = Annotated[Path | None, typer.Option(
    "--key-file", help="pseudonym key, kept outside the output (default: OUT-radiology.key)")]
ModalityOption = Annotated[str | None, typer.Option(
    help="auto (from the files), ct, mr (slices) or cr, dx, us (patches)")]
WindowOption = Annotated[str | None, typer.Option(
    help="auto, file, percentile, minmax, brain, subdural, lung, mediastinum, bone, abdomen")]
SpacingOption = Annotated[float | None, typer.Option(
    "--spacing", help="mm/px for images whose files carry no pixel spacing")]


def _config(config_file: Path | None, modality: str | None, window: str | None,
            spacing: float | None, **extra: object) -> RadiologyConfig:
    return load_radiology_config(config_file, {
        "modality": modality, "window": window, "image": {"pixel_spacing_mm": spacing},
        **extra})


def _report(result: StudyResult) -> None:
    if result.status in ("ok", "cached"):
        console.print(f"[green]{result.status}[/] {result.study_id}: {result.modality} "
                      f"{result.kind}, {result.instances} instances, {result.seconds:.1f} s")
    else:
        console.print(f"[red]{result.status}[/] {escape(result.study_id or '?')}: "
                      f"{escape(result.error)}")


def _write_mapping(path: Path, rows: list[tuple[str, str]]) -> None:
    """Input → pseudonym CSV, beside (never inside) the output folder."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["input", "study_id"])
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def run_radiology_extraction(studies: list[StudyInput], config: RadiologyConfig, out: Path,
                             keys: StudyKeys, overwrite: bool = False) -> int:
    """Extract ``studies`` into ``out`` on Dask (``slidepipe extract`` and ``slidepipe
    radiology extract``): one line per study, ``OUT/radiology_summary.csv`` and the input →
    study id table beside ``out``; returns the exit code."""
    with log_to(out / "slidepipe.log") as log_path:
        try:
            results = extract_studies(studies, config, out, keys, on_study=_report,
                                      overwrite=overwrite, announce=console.print)
        except BackboneError as error:
            raise fatal(error) from error
    write_csv_atomic(out / "radiology_summary.csv", [asdict(r) for r in results])
    _write_mapping(out.absolute().parent / f"{out.name}-pseudonyms.csv",
                   [(s.label, r.study_id) for s, r in zip(studies, results, strict=True)])
    failed = sum(r.status == "failed" for r in results)
    console.print(f"{len(results)} studies: {len(results) - failed} done, {failed} failed; "
                  f"summary: {out / 'radiology_summary.csv'}")
    if failed:
        console.print(f"details of the failures: {log_path}")
    return EXIT_SLIDES_FAILED if failed else EXIT_OK


@app.command()
def extract(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files or folders, NIfTI files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    config_file: ConfigOption = None,
    modality: ModalityOption = None,
    window: WindowOption = None,
    spacing: SpacingOption = None,
    backbone: Annotated[str | None, typer.Option(help="backbone name (default "
                                                      "efficientnet_lite0)")] = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="random initialisation (for quick checks only)")] = False,
    scheduler: Annotated[str | None, typer.Option(
        help="existing Dask scheduler, tcp://HOST:PORT (default: a LocalCluster)")] = None,
    key_file: KeyOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="recompute finished studies")
                         ] = False,
) -> None:
    """Like ``slidepipe extract`` on studies, with the radiology settings (a radiology YAML,
    window, spacing, key file): read each study, build its bag (slices or foreground patches)
    and write its features to OUT/<study_id>/features_<backbone>.zarr on a Dask cluster;
    OUT/radiology_summary.csv lists them."""
    try:
        config = _config(config_file, modality, window, spacing, backbone={
            "name": backbone, "pretrained": False if random_weights else None},
            cluster={"scheduler": scheduler})
        out.mkdir(parents=True, exist_ok=True)
        keys = StudyKeys.for_output(out, key_file or config.key_file)
        studies = discover_studies(inputs)
    except (ConfigError, PseudonymError, RadiologyError, OSError) as error:
        raise fatal(error) from error
    if not studies:
        raise fatal("no studies found in " + ", ".join(map(str, inputs)))
    raise typer.Exit(run_radiology_extraction(studies, config, out, keys, overwrite))


@app.command()
def heatmap(
    inputs: Annotated[list[Path], typer.Argument(help="the studies given to extract")],
    predictions: Annotated[Path, typer.Option(help="predictions CSV of slidepipe predict")],
    features: Annotated[Path, typer.Option(help="the output folder of radiology extract")],
    out: Annotated[Path, typer.Option("--out", "-o", help="export folder")],
    config_file: ConfigOption = None,
    modality: ModalityOption = None,
    window: WindowOption = None,
    spacing: SpacingOption = None,
    key_file: KeyOption = None,
    top_k: Annotated[int, typer.Option(min=1, help="key slices exported per volume")] = 3,
) -> None:
    """Per-slice attention plots, key-slice and radiograph overlays (PNG) and attention NIfTI
    volumes aligned with the input, into OUT/<study_id>/."""
    try:
        config = _config(config_file, modality, window, spacing)
        keys = StudyKeys.for_output(out, key_file or config.key_file or features.absolute()
                                    .parent / f"{features.name}-radiology.key")
        with open(predictions, newline="") as handle:
            rows = {r["slide_id"]: r for r in csv.DictReader(handle)}
        studies = discover_studies(inputs)
        out.mkdir(parents=True, exist_ok=True)
    except (ConfigError, PseudonymError, RadiologyError, OSError, KeyError) as error:
        raise fatal(error) from error
    failed = done = 0
    for study in studies:
        try:
            volume = read_study(study, config, keys)
            row = rows.get(volume.study_id)
            if row is None:
                continue
            store = open_features(store_path(features, volume.study_id, config.backbone.name))
            labels = [name.removeprefix("prob_") for name in row if name.startswith("prob_")]
            attention = study_attention(store, row["attention"],
                                        labels.index(row["predicted"]))
            paths = export_study(volume, store, attention, out / volume.study_id,
                                 config.window, top_k)
            done += 1
            console.print(f"[green]ok[/] {volume.study_id}: {len(paths)} files")
        except (RadiologyError, FeatureStoreError, ValueError, OSError) as error:
            failed += 1
            console.print(f"[red]failed[/] {escape(study.label)}: {escape(str(error))}")
    console.print(f"{done} studies exported, {failed} failed; exports in {out}")
    raise typer.Exit(EXIT_SLIDES_FAILED if failed else EXIT_OK)


@app.command()
def deidentify(
    inputs: Annotated[list[Path], typer.Argument(help="DICOM files or folders")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    key_file: KeyOption = None,
) -> None:
    """Write de-identified copies (DICOM PS3.15 Annex E basic profile, UIDs replaced
    consistently) to OUT/<study_id>/<n>.dcm."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        keys = StudyKeys.for_output(out, key_file)
        studies = find_dicom_studies(inputs)
    except (PseudonymError, RadiologyError, OSError) as error:
        raise fatal(error) from error
    failed = 0
    for study in studies:
        for number, path in enumerate(study.files, start=1):
            try:
                header = read_header(path)
                study_id = keys.study_id("/".join(str(header.get(k, "")) for k in
                                                  ("StudyInstanceUID", "SeriesInstanceUID")))
                digest = keys.digest("patient", str(header.get("PatientID", "")))
                patient = f"patient-{digest.hex()[:12]}"
                deidentify_file(path, out / study_id / f"{number:05d}.dcm", keys, patient)
            except (RadiologyError, OSError, ValueError) as error:
                failed += 1
                console.print(f"[red]failed[/] {escape(str(path))}: {escape(str(error))}")
    console.print(f"{sum(len(s.files) for s in studies) - failed} files de-identified into "
                  f"{out}, {failed} failed")
    raise typer.Exit(EXIT_SLIDES_FAILED if failed else EXIT_OK)

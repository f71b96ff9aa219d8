"""Writing synthetic slides and labelled cohorts: pyramids, lesion GeoJSON and ``labels.csv``."""

from __future__ import annotations

import csv
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Final, Literal

import numpy as np

from wsi.atomic import write_json_atomic, write_text_atomic
from wsi.writer import write_pyramid

from .spec import SyntheticSlideSpec
from .tissue import SyntheticTissue

SlideFormat = Literal["svs", "tiff", "ome"]

#: File suffix written for each output format.
SUFFIXES: Final = {"svs": ".svs", "tiff": ".tiff", "ome": ".ome.tiff"}

#: Pyramid downsamples written for every synthetic slide.
DOWNSAMPLES: Final = (1, 4, 16)

#: Name of the cohort table written by :func:`make_cohort`.
LABELS_CSV: Final = "labels.csv"

#: Class names of the cohort's labels, in index order (a slide with lesions is ``positive``).
LABEL_NAMES: Final = ("negative", "positive")

#: Suffix of the per-slide lesion annotation file (``<slide_id>.lesions.geojson``).
LESIONS_SUFFIX: Final = ".lesions.geojson"


def slide_filename(slide_id: str, fmt: SlideFormat = "svs") -> str:
    """File name of a synthetic slide in ``fmt``."""
    if fmt not in SUFFIXES:
        raise ValueError(f"fmt must be one of {tuple(SUFFIXES)}, got {fmt!r}")
    return f"{slide_id}{SUFFIXES[fmt]}"


def _write_slide(tissue: SyntheticTissue, folder: Path, fmt: SlideFormat, quality: int) -> Path:
    """Write the pyramid of ``tissue`` into ``folder``."""
    spec = tissue.spec
    return write_pyramid(folder / slide_filename(spec.slide_id, fmt), tissue,
                         (spec.width, spec.height), mpp=spec.mpp, fmt=fmt,
                         downsamples=DOWNSAMPLES, quality=quality)


def write_synthetic_slide(spec: SyntheticSlideSpec, folder: str | Path, *,
                          fmt: SlideFormat = "svs", quality: int = 90) -> Path:
    """Render ``spec`` into ``folder/<slide_id>.<svs|tiff|ome.tiff>`` (downsamples 1, 4, 16;
    JPEG tiles of 256 px) and return the path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    return _write_slide(SyntheticTissue(spec), out, fmt, quality)


def write_lesions_geojson(tissue: SyntheticTissue, path: str | Path) -> Path:
    """Write the lesions of ``tissue`` as QuPath GeoJSON (level-0 pixels) and return the path."""
    out = Path(path)
    write_json_atomic(out, tissue.lesion_feature_collection())
    return out


def cohort_specs(n_slides: int = 8, *, size: tuple[int, int] = (8192, 8192), seed: int = 0,
                 positive_fraction: float = 0.5, mpp: float = 0.5
                 ) -> list[SyntheticSlideSpec]:
    """The specs :func:`make_cohort` writes: ``round(n_slides · positive_fraction)`` positives
    with 1-3 lesions each, shuffled among negatives; every slide has its own seed."""
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    rng = np.random.default_rng([seed, 0xC0408])
    n_positive = round(n_slides * positive_fraction)
    positive = np.zeros(n_slides, bool)
    positive[rng.permutation(n_slides)[:n_positive]] = True
    specs = []
    for index in range(n_slides):
        slide_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        specs.append(SyntheticSlideSpec(
            slide_id=f"synth_{index:03d}",
            width=size[0], height=size[1], mpp=mpp, seed=slide_seed,
            n_lesions=int(rng.integers(1, 4)) if positive[index] else 0,
            tissue_fraction=float(rng.uniform(0.38, 0.52)),
        ))
    return specs


def _write_cohort_slide(spec: SyntheticSlideSpec, folder: Path, fmt: SlideFormat) -> Path:
    """Write one cohort slide and, for a positive one, its lesion GeoJSON."""
    tissue = SyntheticTissue(spec)
    path = _write_slide(tissue, folder, fmt, 90)
    if spec.label:
        write_lesions_geojson(tissue, folder / f"{spec.slide_id}{LESIONS_SUFFIX}")
    return path


def make_cohort(folder: str | Path, n_slides: int = 8, *, size: tuple[int, int] = (8192, 8192),
                seed: int = 0, positive_fraction: float = 0.5, fmt: SlideFormat = "svs",
                workers: int = 1) -> Path:
    """Write a labelled synthetic cohort into ``folder`` and return its ``labels.csv``.

    ``labels.csv`` has columns ``slide_id, patient_id, label, path`` (label ``positive`` = has
    lesions, else ``negative``; one patient per slide; ``path`` relative to the CSV's folder as
    manifests are read) and is written last, atomically, so its presence means the cohort is
    complete. Every positive
    slide also gets ``<slide_id>.lesions.geojson`` beside it: its lesion outlines as QuPath
    annotations of class ``Tumor`` in level-0 pixels. The same arguments always write the same
    pixels and files; ``workers`` > 1 writes slides in that many processes.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    specs = cohort_specs(n_slides, size=size, seed=seed, positive_fraction=positive_fraction)
    if workers == 1:
        paths = [_write_cohort_slide(spec, out, fmt) for spec in specs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(specs))) as pool:
            paths = list(pool.map(_write_cohort_slide, specs, [out] * len(specs),
                                  [fmt] * len(specs)))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide_id", "patient_id", "label", "path"])
    for index, (spec, path) in enumerate(zip(specs, paths, strict=True)):
        writer.writerow([spec.slide_id, f"patient_{index:03d}", LABEL_NAMES[spec.label],
                         path.name])
    labels = out / LABELS_CSV
    write_text_atomic(labels, buffer.getvalue())
    return labels


def read_labels(path: str | Path) -> list[dict[str, str]]:
    """Rows of a cohort ``labels.csv`` with ``path`` resolved against the CSV's folder."""
    csv_path = Path(path)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = str(csv_path.parent / row["path"])
    return rows

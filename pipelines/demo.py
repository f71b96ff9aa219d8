"""The demo: a synthetic cohort generated on the spot, run through the pipeline with the
embedded defaults. It needs no data and no network."""

from __future__ import annotations

import json
from pathlib import Path

from wsi.atomic import write_json_atomic

from .synthetic import make_cohort

DEMO_SLIDES = 6
DEMO_SIZE = 8192
DEMO_SEED = 0


def generate_demo_cohort(out: Path, n_slides: int = DEMO_SLIDES,
                         size: tuple[int, int] = (DEMO_SIZE, DEMO_SIZE)) -> Path:
    """Write the demo's slides (reused when already there) and return its labels CSV, which
    doubles as the manifest of the run."""
    folder = out / "slides"
    labels, stamp = folder / "labels.csv", folder / "cohort.json"
    wanted = {"n_slides": n_slides, "size": list(size), "seed": DEMO_SEED}
    if labels.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return labels
    labels = make_cohort(folder, n_slides, size=size, seed=DEMO_SEED)
    write_json_atomic(stamp, wanted)
    return labels

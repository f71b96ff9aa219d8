"""Procedural H&E-like whole slides with known lesions, for the demo cohort and the tests.

A :class:`SyntheticTissue` is a :data:`wsi.writer.RegionRenderer`: every pixel is a function of
its centre in continuous level-0 coordinates, so any window, at any downsample, renders the same
tissue. Nothing is drawn from per-call random numbers:

- smooth fields (tissue outline, lumens, stroma density, collagen fibres) are bilinear samples of
  a precomputed signed-distance grid or of small periodic noise tables, mip-mapped so coarse
  levels see their box-filtered average;
- nuclei live on a rotated, gently warped level-0 cell grid; each cell's nucleus (presence,
  position, size, shape, orientation, stain) comes from a hash of the cell's indices;
- colour follows Beer-Lambert: haematoxylin and eosin optical densities are mixed and turned into
  RGB through a per-slide lookup table.

Downsamples above :data:`MAX_DIRECT_DOWNSAMPLE` are rendered by supersampling (up to
:data:`MAX_SUPERSAMPLE` x :data:`MAX_SUPERSAMPLE` samples a pixel) and averaging; beyond what that
reaches, nuclei are replaced by their expected coverage (a smoothed colour field).

Positive slides hold round-ish "tumour" lesions (radius 300-800 µm by default) of densely packed,
large, dark, pleomorphic vesicular nuclei with nucleoli in pale cytoplasm; their exact outlines are
available as polygons and as ground-truth masks, and :func:`make_cohort` writes them as QuPath
GeoJSON next to the slides.

Modules:

- :mod:`.noise`: hashing and smooth periodic noise primitives;
- :mod:`.spec`: :class:`SyntheticSlideSpec`;
- :mod:`.geometry`: the tissue outline and the lesions (:class:`Lesion`);
- :mod:`.stain`: haematoxylin and eosin colour;
- :mod:`.nuclei`: nucleus cell grids, shapes and shading;
- :mod:`.tissue`: :class:`SyntheticTissue`, rendering and ground truth;
- :mod:`.cohort`: writing slides, lesion GeoJSON and labelled cohorts.
"""

from __future__ import annotations

from collections.abc import Sequence

from .cohort import (
    DOWNSAMPLES,
    LABEL_NAMES,
    LABELS_CSV,
    LESIONS_SUFFIX,
    cohort_specs,
    make_cohort,
    read_labels,
    slide_filename,
    write_lesions_geojson,
    write_synthetic_slide,
)
from .geometry import Lesion
from .noise import PeriodicNoise
from .spec import SyntheticSlideSpec
from .tissue import SyntheticTissue

__all__: Sequence[str] = [
    "DOWNSAMPLES",
    "LABELS_CSV",
    "LABEL_NAMES",
    "LESIONS_SUFFIX",
    "Lesion",
    "PeriodicNoise",
    "SyntheticSlideSpec",
    "SyntheticTissue",
    "cohort_specs",
    "make_cohort",
    "read_labels",
    "slide_filename",
    "write_lesions_geojson",
    "write_synthetic_slide",
]

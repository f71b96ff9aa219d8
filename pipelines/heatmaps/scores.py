"""What a heatmap is made of: a slide's prediction row and its stored per-patch attention.

``slidepipe predict`` writes a predictions CSV (``slide_id, predicted, prob_<class>…,
model_hash, attention``) and the attention array ``attention_<hash>`` (N,) or (C, N) into
each slide's feature store, beside ``coords``. Nothing is re-inferred here.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from mil.heatmap import PatchSet
from mil.heatmap_scale import Normaliser, fit_normaliser
from wsi import GridSpec

from ..feature_store import FeatureStoreError, open_features
from .settings import HeatmapSettings

#: Columns every predictions CSV row must have (besides ``prob_<class>``).
PREDICTION_COLUMNS = ("slide_id", "predicted", "model_hash", "attention")

#: Grid fields copied from a store's provenance into exports (none identifies the slide).
GRID_FIELDS = ("target_mpp", "effective_mpp", "patch_size", "patch_size_level0", "overlap",
               "step_level0", "level0_mpp", "patch_level")


class HeatmapInputError(ValueError):
    """A prediction, feature store or slide cannot make a heatmap; the message says why."""


@dataclass(frozen=True)
class Prediction:
    """One row of a predictions CSV."""

    slide_id: str
    predicted: str
    probabilities: dict[str, float]
    model_hash: str
    attention: str

    @property
    def probability(self) -> float | None:
        """The probability of the predicted class."""
        return self.probabilities.get(self.predicted)


def read_predictions(path: str | Path) -> dict[str, Prediction]:
    """The rows of a ``slidepipe predict`` CSV by slide id."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except OSError as error:
        raise HeatmapInputError(f"{path}: cannot read the predictions: {error}") from error
    missing = [c for c in PREDICTION_COLUMNS if c not in columns]
    probs = [c for c in columns if c.startswith("prob_")]
    if missing or not probs:
        raise HeatmapInputError(f"{path}: not a slidepipe predictions CSV (missing "
                                f"{', '.join(missing) or 'prob_<class> columns'}); make it "
                                "with slidepipe predict")
    predictions = {}
    for line, row in enumerate(rows, start=2):
        try:
            probabilities = {c[len("prob_"):]: float(row[c]) for c in probs}
        except ValueError as error:
            raise HeatmapInputError(f"{path}, line {line}: {error}") from error
        predictions[row["slide_id"]] = Prediction(
            slide_id=row["slide_id"], predicted=row["predicted"], probabilities=probabilities,
            model_hash=row["model_hash"], attention=row["attention"])
    return predictions


def find_store(features: Path, slide_id: str, attention: str) -> Path:
    """The feature store under ``features/<slide_id>/`` that holds the attention array."""
    candidates = sorted((features / slide_id).glob("features_*.zarr"))
    holding = [store for store in candidates if (store / attention / "zarr.json").is_file()]
    if len(holding) == 1:
        return holding[0]
    if not holding:
        found = ", ".join(p.name for p in candidates) or "no feature store"
        raise HeatmapInputError(f"{features / slide_id}: {found} holds the attention array "
                                f"{attention!r}; run slidepipe predict on these features first")
    raise HeatmapInputError(f"{features / slide_id}: several feature stores hold {attention!r} "
                            f"({', '.join(p.name for p in holding)}); keep one")


def grid_spec(grid: dict[str, Any]) -> GridSpec:
    """The :class:`wsi.GridSpec` recorded in a feature store's provenance."""
    fields = {k: v for k, v in grid.items() if k != "effective_mpp"}
    fields["level"] = fields.pop("patch_level")
    return GridSpec(**fields)


@dataclass(frozen=True)
class TopPatch:
    """A high-scoring patch: rank 1 is the highest; level-0 top-left (x, y) and side."""

    rank: int
    x: int
    y: int
    size: int
    score: float
    attention: float


@dataclass(frozen=True)
class SlideScores:
    """One slide's patches with raw and normalised scores, the features' provenance (only
    fields that identify no slide) and the content hash of the slide they were made from."""

    coords: np.ndarray
    attention: np.ndarray
    normaliser: Normaliser
    footprint: int
    attention_class: str | None
    grid: dict[str, Any]
    provenance: dict[str, Any]
    slide_hash: str | None

    @cached_property
    def values(self) -> np.ndarray:
        """Normalised scores (N,) float32 in [0, 1]."""
        return self.normaliser(self.attention)

    @cached_property
    def order(self) -> np.ndarray:
        """Patch indices from the highest raw score to the lowest (stable)."""
        return np.argsort(-self.attention, kind="stable")

    @cached_property
    def ranks(self) -> np.ndarray:
        """Rank of each patch (N,), 1 = highest score."""
        ranks = np.empty(self.order.size, dtype=np.int64)
        ranks[self.order] = np.arange(1, self.order.size + 1)
        return ranks

    def patch_set(self) -> PatchSet:
        """The patches with their normalised scores, ready to render."""
        return PatchSet(self.coords, self.values, self.footprint)

    def extra_set(self, coords: np.ndarray, scores: np.ndarray, footprint: int) -> PatchSet:
        """Further patches of this slide (e.g. finer ones inside the top regions) with raw
        scores, normalised on this slide's scale so they merge into the same map."""
        return PatchSet(coords, self.normaliser(np.asarray(scores)), footprint)

    def top(self, k: int) -> list[TopPatch]:
        """The ``k`` highest-scoring patches."""
        return [TopPatch(rank=rank, x=int(self.coords[i, 0]), y=int(self.coords[i, 1]),
                         size=self.footprint, score=float(self.values[i]),
                         attention=float(self.attention[i]))
                for rank, i in enumerate(self.order[:k], start=1)]


def _select_class(values: np.ndarray, attrs: dict[str, Any], prediction: Prediction,
                  wanted: str | None, where: Path) -> tuple[np.ndarray, str | None]:
    if values.ndim == 1:
        return values, None
    names = list(attrs.get("label_names") or [])
    name = wanted or prediction.predicted
    if values.ndim != 2 or name not in names or len(names) != values.shape[0]:
        raise HeatmapInputError(f"{where}: attention of shape {values.shape} with classes "
                                f"{names}; cannot show class {name!r}")
    return values[names.index(name)], name


def load_scores(store_path: Path, prediction: Prediction, settings: HeatmapSettings
                ) -> SlideScores:
    """Coordinates, attention and provenance of one slide, normalised as ``settings`` say."""
    try:
        store = open_features(store_path)
        array = zarr.open_array(store_path / prediction.attention, mode="r", zarr_format=3)
        raw = np.asarray(array[:], dtype=np.float64)
    except (FeatureStoreError, FileNotFoundError, OSError) as error:
        raise HeatmapInputError(f"{store_path}: cannot read {prediction.attention!r}: "
                                f"{error}") from error
    attention, name = _select_class(raw, dict(array.attrs), prediction,
                                    settings.attention_class, store_path)
    coords = store.coords
    if attention.shape != (coords.shape[0],):
        raise HeatmapInputError(f"{store_path}: {prediction.attention} has {attention.size} "
                                f"values for {coords.shape[0]} patches; run slidepipe predict "
                                "again")
    grid = store.attrs.get("grid") or {}
    if "patch_size_level0" not in grid:
        raise HeatmapInputError(f"{store_path}: the store records no grid geometry "
                                "(patch_size_level0); re-extract the features")
    provenance = {key: store.attrs.get(key) for key in
                  ("backbone", "weights_hash", "feature_dim", "slidepipe_version")}
    provenance["grid"] = {key: grid[key] for key in GRID_FIELDS if key in grid}
    return SlideScores(
        coords=np.asarray(coords), attention=attention,
        normaliser=fit_normaliser(attention, settings.normalise, settings.percentiles,
                                  "attention" if name is None else f"attention ({name})"),
        footprint=int(grid["patch_size_level0"]), attention_class=name, grid=dict(grid),
        provenance=provenance, slide_hash=store.attrs.get("slide_hash"))

"""The ``heatmap:`` settings shared by ``slidepipe heatmap`` and batch runs.

Nothing here imports :mod:`pipelines.config` (which loads the backbones, hence torch): a heatmap
export needs no model, and torch alone would double the export's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mil.heatmap_scale import Normalisation, check_colormap

from ..settings_io import validation_problems


class HeatmapSettingsError(ValueError):
    """A heatmap config or override is invalid; the message names the file and the field."""


class HeatmapSettings(BaseModel):
    """How heatmaps are rendered and exported (the ``heatmap:`` section of a config).

    Defaults::

        heatmap:
          normalise: percentile     # percentile | rank | absolute (per slide)
          percentiles: [1.0, 99.0]  # clip points of the percentile normalisation
          colormap: viridis         # viridis | magma | inferno | plasma | cividis
          threshold: 0.65           # normalised score outlined as a region
          smooth_um: 0.0            # Gaussian sigma (µm) of the overlay; 0: none
          output_mpp: null          # µm/px of the overlay; null: fit overlay_max_side
          overlay_max_side: 2048    # longest side of the overlay PNG, px
          opacity: 0.5              # heatmap opacity over tissue in the overlay
          top_k: 16                 # patches in the gallery (0: no gallery)
          gallery_format: png       # png | jpeg
          attention_class: null     # class shown for per-class attention; null: predicted
          tiff: true                # pyramidal TIFF of the scores (QuPath overlay)
          geojson: true             # QuPath tiles with measurements + threshold regions
          pseudonymise: false       # replace slide names by keyed-hash pseudonyms
          pseudonym_key: null       # secret key file (created when missing)
          pseudonym_map: null       # CSV slide_id → pseudonym, outside the export folder
    """

    model_config = ConfigDict(extra="forbid")

    normalise: Normalisation = Field(
        "percentile", description="per-slide normalisation: percentile (clip, stretch to 0-1), "
        "rank (uniform 0-1) or absolute (the scores as stored, e.g. probabilities)")
    percentiles: tuple[float, float] = Field(
        (1.0, 99.0), description="low and high percentiles of the percentile normalisation")
    colormap: str = Field("viridis", description="perceptual colormap name")
    threshold: float = Field(0.65, ge=0, le=1,
                             description="normalised score at or above which areas are outlined")
    smooth_um: float = Field(0.0, ge=0, description="Gaussian sigma of the overlay raster, µm; "
                             "0: none (the TIFF and GeoJSON always hold the patch values)")
    output_mpp: float | None = Field(None, gt=0, description="µm/px of the overlay raster and "
                                     "PNG; None: the slide fitted into overlay_max_side")
    overlay_max_side: int = Field(2048, ge=64, description="longest side of the overlay, px")
    opacity: float = Field(0.5, gt=0, le=1, description="heatmap opacity over tissue")
    top_k: int = Field(16, ge=0, description="highest-scoring patches saved as crops")
    gallery_format: Literal["png", "jpeg"] = Field("png", description="format of the crops")
    attention_class: str | None = Field(
        None, description="class whose attention is shown when the model has one per class; "
        "None: the predicted class")
    tiff: bool = Field(True, description="write the pyramidal TIFF of the scores")
    geojson: bool = Field(True, description="write the QuPath GeoJSON")
    pseudonymise: bool = Field(False, description="replace slide names by stable pseudonyms")
    pseudonym_key: Path | None = Field(
        None, description="file holding the pseudonyms' secret key (created when missing); "
        "None: beside the mapping CSV")
    pseudonym_map: Path | None = Field(
        None, description="CSV slide_id → pseudonym, outside the export folder; None: "
        "OUT-pseudonyms.csv beside it")

    @field_validator("colormap")
    @classmethod
    def _known_colormap(cls, name: str) -> str:
        return check_colormap(name)

    @field_validator("percentiles")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] < value[1] <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {value}")
        return value


def load_heatmap_settings(path: str | Path | None = None,
                          overrides: dict[str, Any] | None = None) -> HeatmapSettings:
    """The ``heatmap:`` section of a YAML config (other sections are ignored) with
    ``overrides`` applied (``None`` values are ignored); defaults without a file."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise HeatmapSettingsError(f"{path}: cannot read the config: {error}") from error
        if not isinstance(loaded, dict) or not isinstance(loaded.get("heatmap", {}), dict):
            raise HeatmapSettingsError(f"{path}: the heatmap section must be a mapping of settings")
        data = dict(loaded.get("heatmap") or {})
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return HeatmapSettings.model_validate(data)
    except ValidationError as error:
        raise HeatmapSettingsError(f"{path or 'heatmap settings'}: "
                                   f"{validation_problems(error, 'heatmap.')}") from error

"""The slidepipe configuration: YAML files validated by typed models, overridden by CLI flags.

Every output records the fully resolved configuration it was made with
(:meth:`SlidepipeConfig.resolved`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wsi import GridSettings, PatchQCSettings, TissueSettings

from .backbones import BackboneConfig
from .cluster import ClusterConfig
from .settings_io import merge_settings, validation_problems
from .stain import StainConfig


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field."""


class SlideOptions(BaseModel):
    """How slides are opened (the ``slides:`` section)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    mpp: float | None = Field(None, gt=0, description="µm/px for every slide (overrides files)")
    mpp_overrides: Path | None = Field(
        None, description="CSV with columns slide,mpp for slides lacking resolution metadata")


class ExtractionConfig(BaseModel):
    """How features are computed and stored (the ``extraction:`` section)."""

    model_config = ConfigDict(extra="forbid")

    chunk_rows: int | None = Field(
        None, ge=1, description="patches per task and per zarr chunk (default: 512 where the "
        "backbone runs on a GPU, 128 on CPU)")
    dtype: Literal["float16", "float32"] = "float16"
    decode_threads: int = Field(2, ge=1, description="patch-decoding threads per task")
    export_hdf5: bool = Field(True, description="also write h5_files/<slide>.h5 (CLAM/TRIDENT)")
    export_pt: bool = Field(False, description="also write pt_files/<slide>.pt (CLAM trainer)")
    overwrite: bool = Field(False, description="recompute complete stores")


class SlidepipeConfig(BaseModel):
    """The whole configuration; each section belongs to one stage."""

    model_config = ConfigDict(extra="forbid")

    slides: SlideOptions = SlideOptions()
    tissue: TissueSettings = TissueSettings()
    tiling: GridSettings = GridSettings()
    qc: PatchQCSettings = PatchQCSettings()
    backbone: BackboneConfig = BackboneConfig()
    stain: StainConfig = StainConfig()
    extraction: ExtractionConfig = ExtractionConfig()
    cluster: ClusterConfig = ClusterConfig()

    def resolved(self) -> dict[str, Any]:
        """The configuration as plain JSON-able data, for provenance records."""
        return self.model_dump(mode="json")


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> SlidepipeConfig:
    """Load ``path`` (or the built-in defaults, documented in ``configs/default.yaml``) and
    apply ``overrides`` (nested dict, e.g. ``{"tiling": {"target_mpp": 1.0}}``; ``None`` values
    are ignored)."""
    data: dict[str, Any] = {}
    source = Path(path) if path is not None else None
    if source is not None:
        try:
            loaded = yaml.safe_load(source.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"{source}: cannot read the config: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: a config must be a mapping of sections")
        data = loaded
    data = merge_settings(data, overrides or {})
    try:
        return SlidepipeConfig.model_validate(data)
    except ValidationError as error:
        where = str(source) if source else "config"
        raise ConfigError(f"{where}: {validation_problems(error)}") from error

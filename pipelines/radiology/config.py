"""The radiology configuration: how studies are read, turned into bags and embedded.

A YAML file (``configs/radiology.example.yaml``) validated by these pydantic models; CLI flags
override it; every feature store records the resolved configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..backbones import BackboneConfig
from ..cluster import ClusterConfig
from ..config import ConfigError
from ..settings_io import merge_settings, validation_problems
from .windowing import check_window

Modality = Literal["auto", "ct", "mr", "cr", "dx", "us"]
#: Modalities whose studies are bags of slices; the others are bags of image patches.
SLICE_MODALITIES = frozenset({"ct", "mr"})


class VolumeBagSettings(BaseModel):
    """CT/MR/NIfTI: one instance per slice, resampled in-plane (the ``volume:`` section)."""

    model_config = ConfigDict(extra="forbid")

    spacing_mm: float = Field(1.5, gt=0, description="target in-plane spacing, mm/px")
    size: int = Field(256, ge=16, description="slice field of view in px at spacing_mm "
                                              "(centred crop or pad)")
    context: int = Field(0, ge=0, le=8, description="0: the slice in all three channels; "
                         "k: 2.5D, slices (i-k, i, i+k) as the three channels")
    slice_step: int = Field(1, ge=1, description="use every n-th slice")


class ImageBagSettings(BaseModel):
    """Radiographs and ultrasound: grid patches over the foreground (the ``image:`` section)."""

    model_config = ConfigDict(extra="forbid")

    spacing_mm: float = Field(0.5, gt=0, description="target spacing of the patches, mm/px")
    patch_size: int = Field(224, ge=16)
    overlap: int = Field(0, ge=0, description="overlap of neighbouring patches, px")
    min_foreground: float = Field(0.5, ge=0, le=1, description="foreground fraction to keep a "
                                  "patch")
    max_frames: int = Field(8, ge=1, description="cine loops: frames used, evenly spaced")
    pixel_spacing_mm: float | None = Field(
        None, gt=0, description="mm/px for images whose files carry none")


class RadiologyConfig(BaseModel):
    """Everything ``slidepipe radiology extract`` needs besides its inputs."""

    model_config = ConfigDict(extra="forbid")

    modality: Modality = Field("auto", description="auto: from the files (NIfTI: mr)")
    window: str = Field("auto", description="auto, file, percentile, minmax or a CT preset")
    volume: VolumeBagSettings = VolumeBagSettings()
    image: ImageBagSettings = ImageBagSettings()
    backbone: BackboneConfig = BackboneConfig()
    dtype: Literal["float16", "float32"] = "float16"
    chunk_rows: int = Field(512, ge=1)
    key_file: Path | None = Field(None, description="pseudonym key (default: OUT-radiology.key "
                                                    "beside the output folder)")
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("window")
    @classmethod
    def _known_window(cls, value: str) -> str:
        return check_window(value)

    def bag_grids(self) -> list[tuple[float, int]]:
        """(µm/px, instance size) of the bags: slices, then image patches; what a feature
        store's ``grid`` records and MIL models are checked against."""
        return [(self.volume.spacing_mm * 1000.0, self.volume.size),
                (self.image.spacing_mm * 1000.0, self.image.patch_size)]

    def resolved(self) -> dict[str, Any]:
        """The configuration as plain JSON, for provenance (the key file's path and where the
        graph ran omitted: neither changes a feature)."""
        return self.model_dump(mode="json", exclude={"key_file", "cluster"})


def load_radiology_config(path: Path | None, overrides: dict[str, Any] | None = None
                          ) -> RadiologyConfig:
    """The YAML at ``path`` (or the defaults) with non-None ``overrides`` applied."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {} if path is not None else {}
        return RadiologyConfig.model_validate(merge_settings(data, overrides or {}))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the config: {error}") from error
    except ValidationError as error:
        raise ConfigError(f"{path or 'radiology settings'}: {validation_problems(error)}"
                          ) from error

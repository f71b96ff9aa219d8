"""The run configuration: a YAML file naming the archive, the model and the output folder,
with the usual slidepipe sections (``tiling:``, ``backbone:``, ``cluster:``…), the
``heatmap:`` section and the ``run:`` options. CLI flags override it.

Example::

    archive: [/archive/slides, /archive/extra-manifest.csv]
    model: /models/abmil-run           # a `slidepipe train` run folder or model.pt file(s)
    out: /data/slidepipe-nightly
    stages: [tile, extract, predict, export]
    run: {max_runtime: 8h, slide_timeout: 2h, notify: "mail -s slidepipe it@example.org"}
    backbone: {name: efficientnet_lite0}

Relative paths of ``archive``, ``model`` and ``out`` are relative to the config file; give
the paths inside the other sections as absolute paths (cron jobs start elsewhere).
"""

from __future__ import annotations

import re
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..config import ConfigError, SlidepipeConfig
from ..heatmaps.settings import HeatmapSettings
from ..radiology.config import RadiologyConfig
from ..settings_io import merge_settings, validation_problems

Stage = Literal["tile", "extract", "predict", "export"]
STAGES: tuple[Stage, ...] = ("tile", "extract", "predict", "export")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])", re.IGNORECASE)
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: object) -> float | None:
    """Seconds from ``8h``, ``30m``, ``1h30m``, ``45s``, ``2d`` or a plain number (seconds);
    ``None`` stays ``None``. Raises ValueError for anything else."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise ValueError(f"{value!r} is not a duration; write e.g. 8h, 30m, 1h30m, 90s or a "
                         "number of seconds")
    return sum(float(amount) * _UNIT_SECONDS[unit.lower()] for amount, unit in parts)


def parse_since(value: object) -> datetime | None:
    """A date (``2024-05-01``, local midnight) or date-time (ISO 8601) as a datetime."""
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime.combine(value, time())
    try:
        return datetime.fromisoformat(str(value).strip())
    except ValueError as error:
        raise ValueError(f"{value!r} is not a date; write e.g. 2024-05-01 or "
                         "2024-05-01T18:00") from error


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str | Path) else value


Duration = Annotated[float | None, BeforeValidator(parse_duration)]
PathList = Annotated[list[Path], BeforeValidator(_as_list)]
PatternList = Annotated[list[str], BeforeValidator(_as_list)]


class RunOptions(BaseModel):
    """How a run behaves (the ``run:`` section)."""

    model_config = ConfigDict(extra="forbid")

    retry_failed: bool = Field(False, description="process failed and quarantined slides "
                               "again (otherwise only new or changed slides)")
    only: PatternList = Field(default_factory=list, description="shell patterns; only slides "
                              "whose id, file name or path matches one are processed")
    since: Annotated[datetime | None, BeforeValidator(parse_since)] = Field(
        None, description="only slides whose files changed at or after this date")
    max_runtime: Duration = Field(None, description="stop starting slides after this long "
                                  "(e.g. 8h); the next run continues")
    stop_grace: Duration = Field(600.0, description="after max_runtime, slides under way get "
                                 "this long to finish before they are interrupted")
    slide_timeout: Duration = Field(None, description="a slide whose tasks have run longer "
                                    "than this in all is quarantined as hung (e.g. 2h)")
    worker_crashes: int = Field(2, ge=0, description="a slide is quarantined when a worker "
                                "dies while running it more than this many times "
                                "(LocalCluster; an existing cluster uses its scheduler's "
                                "distributed.scheduler.allowed-failures)")
    max_active_slides: int | None = Field(None, ge=1, description="slides under way at once "
                                          "(default: the cluster's slots + 2)")
    notify: str | None = Field(None, description="shell command run at the end with the "
                               "one-line summary on stdin ({summary} in it is replaced by the "
                               "quoted summary)")
    html_worklist: bool = Field(True, description="write the HTML worklist with deep-zoom "
                                "viewers of the slides exported by the run")


class RunConfig(SlidepipeConfig):
    """A ``slidepipe run`` configuration: the slidepipe sections plus what the run needs."""

    archive: PathList = Field(min_length=1, description="slide files, folders (recursive) and "
                              "manifest CSVs")
    model: PathList = Field(default_factory=list, description="a slidepipe train run folder "
                            "or model.pt file(s); needed by the predict stage")
    out: Path | None = Field(None, description="output folder (or --out)")
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES),
                                description="the stages to run, from tile on")
    heatmap: HeatmapSettings = HeatmapSettings()
    radiology: RadiologyConfig = Field(
        RadiologyConfig(), description="how radiology studies in the archive become bags "
        "(modality, window, volume, image, dtype, key_file); their backbone and cluster are "
        "the run's")
    run: RunOptions = RunOptions()

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if tuple(self.stages) != STAGES[:len(self.stages)]:
            raise ValueError(f"stages must run in order from tile on (e.g. [tile, extract]); "
                             f"got {self.stages}")
        if self.heatmap.pseudonymise:
            raise ValueError("heatmap.pseudonymise is not available in slidepipe run (its "
                             "outputs are named by slide id); export pseudonymised heatmaps "
                             "from the run's folder with slidepipe heatmap")
        if "predict" in self.stages and not self.model:
            raise ValueError("the predict stage needs a model: set model to a slidepipe train "
                             "run folder or model.pt file(s), or drop predict and export from "
                             "stages")
        return self

    def pipeline(self) -> SlidepipeConfig:
        """The slidepipe sections alone, as recorded in the outputs' provenance."""
        return SlidepipeConfig.model_validate(
            self.model_dump(include=set(SlidepipeConfig.model_fields)))


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a run config and apply ``overrides`` (nested dict; ``None`` values are ignored).
    Raises :class:`ConfigError` naming the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the run config: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping (archive, model, out, …)")
    data = merge_settings(data, overrides or {})
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{path}: {validation_problems(error)}") from error
    base = path.parent

    def anchored(item: Path) -> Path:
        return item if item.is_absolute() else base / item

    return config.model_copy(update={
        "archive": [anchored(p) for p in config.archive],
        "model": [anchored(p) for p in config.model],
        "out": anchored(config.out) if config.out is not None else None})

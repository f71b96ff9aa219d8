"""The predict stage: the MIL model (or the ensemble of a run's fold models) applied to one
slide's features on a worker, through :func:`pipelines.mil_run.predict_slides`.

Each slide gets ``OUT/slides/<slide>/prediction.csv`` (one row, written atomically) and the
attention array ``attention_<model hash>`` in its feature store, which the export stage reads.
The triage *risk* of a slide is its expected grade on [0, 1]: the class probabilities weighted
by class index / (classes − 1), so the probability of the positive class for a binary model and
the expected grade for an ordinal one (list ``label_names`` from benign to most severe).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..extract_worker import BackboneIdentity
from ..mil_run import ensemble, ensemble_hash, predict_slides


@dataclass(frozen=True)
class ModelInfo:
    """The model of a run: its checkpoints (files or run folders), ensemble hash, class
    names and the feature provenance it was trained on."""

    paths: tuple[str, ...]
    model_hash: str
    label_names: tuple[str, ...]
    task: str
    feature_provenance: dict[str, Any]

    @classmethod
    def load(cls, model_paths: list[Path]) -> ModelInfo:
        """Read the checkpoints (a run folder means all its fold models); raises ConfigError
        when there are none or they disagree."""
        models = ensemble(model_paths)
        metadata = [meta for _, meta, _ in models]
        first = metadata[0]
        for meta in metadata[1:]:
            if (meta["label_names"] != first["label_names"]
                    or meta["feature_provenance"] != first["feature_provenance"]):
                raise ConfigError(f"the models in {', '.join(map(str, model_paths))} disagree "
                                  "on classes or features; give models of one training run")
        return cls(paths=tuple(map(str, model_paths)),
                   model_hash=ensemble_hash([h for _, _, h in models]),
                   label_names=tuple(first["label_names"]), task=str(first.get("task", "")),
                   feature_provenance=dict(first["feature_provenance"]))

    def check_features(self, backbone: BackboneIdentity,
                       grids: Sequence[tuple[float | None, int]]) -> None:
        """Raise ConfigError when the run would extract features the model was not trained
        on: another backbone or weights, or none of the run's ``grids`` (µm/px, patch size:
        the slides' tiling, the radiology bags')."""
        wanted = self.feature_provenance
        problems = []
        if wanted.get("backbone") != backbone.name:
            problems.append(f"backbone {wanted.get('backbone')!r}, not {backbone.name!r}")
        elif wanted.get("weights_hash") != backbone.weights_hash:
            problems.append(f"weights {wanted.get('weights_hash')}, not "
                            f"{backbone.weights_hash}")
        if not any(wanted.get("patch_size") == size
                   and (mpp is None or wanted.get("target_mpp") in (None, mpp))
                   for mpp, size in grids):
            problems.append(f"{wanted.get('target_mpp')} µm/px and patch size "
                            f"{wanted.get('patch_size')}, not "
                            + " or ".join(f"{mpp} µm/px and {size}" for mpp, size in grids))
        if problems:
            raise ConfigError(f"the model was trained on features with {'; '.join(problems)}; "
                              "set the run config's backbone and tiling (or radiology) "
                              "sections to match it")


def risk_score(probabilities: list[float]) -> float:
    """The expected class index scaled to [0, 1] (see the module docstring)."""
    if len(probabilities) < 2:
        return float(probabilities[0]) if probabilities else 0.0
    top = len(probabilities) - 1
    return float(sum(p * index for index, p in enumerate(probabilities)) / top)


@dataclass(frozen=True)
class PredictJob:
    """One slide to predict."""

    models: tuple[str, ...]
    features: str
    slide_id: str
    out_csv: str
    device: str = "auto"


def predict_slide(job: PredictJob) -> dict[str, Any]:
    """Predict one slide (runs on a worker); returns its prediction row, with the
    probabilities in class order under ``probabilities`` and the triage ``risk``."""
    csv_path = predict_slides([Path(p) for p in job.models], Path(job.features),
                              [job.slide_id], Path(job.out_csv), device=job.device)
    with open(csv_path, newline="") as handle:
        row: dict[str, Any] = next(csv.DictReader(handle))
    names = [column[len("prob_"):] for column in row if column.startswith("prob_")]
    probabilities = {name: float(row[f"prob_{name}"]) for name in names}
    return {"predicted": row["predicted"], "probabilities": probabilities,
            "model_hash": row["model_hash"], "attention": row["attention"],
            "probability": probabilities.get(row["predicted"]),
            "risk": risk_score(list(probabilities.values()))}

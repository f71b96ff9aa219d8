"""MIL runs: train with patient-level cross-validation, evaluate, predict, compare.

A run folder holds everything needed to reproduce and audit it::

    RUN/config.json               the resolved configuration
    RUN/folds/fold_<i>.csv        slide, patient and split of every fold
    RUN/fold_<i>/model.pt         the best model of the fold, with its feature provenance
    RUN/fold_<i>/history.csv      per-epoch losses and validation AUC (and tensorboard/)
    RUN/predictions_oof.csv       out-of-fold test predictions of every case
    RUN/metrics.json, *.png       evaluation (see :mod:`pipelines.mil_report`)
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mil.data import BagDataset, Case, make_cases
from mil.evaluation import choose_threshold
from mil.models import build_model
from mil.splits import (
    Fold,
    LabelTable,
    fixed_split,
    leave_one_site_out,
    patient_folds,
    read_label_table,
    write_folds,
)
from mil.train import EpochLog, TrainConfig, evaluate_loss, resolve_device, train_model
from wsi.atomic import write_bytes_atomic, write_json_atomic

from .config import ConfigError
from .extract import backbone_tag
from .feature_store import FeatureStoreError, open_features
from .settings_io import validation_problems
from .tile import write_csv_atomic

#: Feature provenance a model must match to be applied to a store.
PROVENANCE_KEYS = ("backbone", "weights_hash", "feature_dim", "target_mpp", "patch_size")


class CVConfig(BaseModel):
    """How cases are split (the ``cv:`` section)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["kfold", "fixed", "leave_one_site_out"] = "kfold"
    folds: int = Field(5, ge=3)
    seed: int = 0
    site_column: str = "site"


class EvaluationConfig(BaseModel):
    """How predictions are judged (the ``evaluation:`` section)."""

    model_config = ConfigDict(extra="forbid")

    threshold: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0, le=1)
    n_bootstrap: int = Field(1000, ge=0)
    temperature_scaling: bool = False
    subgroups: list[str] = Field(default_factory=list, description="label-table columns")


class MILRunConfig(BaseModel):
    """A MIL experiment: labels, features, task, splits, training and evaluation."""

    model_config = ConfigDict(extra="forbid")

    labels: Path = Field(description="CSV: slide_id, patient_id, label [, site, split, …]")
    features: Path = Field(description="the output folder of slidepipe extract")
    backbone: str = "efficientnet_lite0"
    task: Literal["binary", "multiclass", "ordinal"] = "binary"
    label_names: list[str] | None = Field(None, description="class names in index order")
    case_level: Literal["slide", "patient"] = "slide"
    cv: CVConfig = CVConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvaluationConfig = EvaluationConfig()


def load_mil_config(path: str | Path, overrides: dict[str, Any] | None = None) -> MILRunConfig:
    """Read a MIL YAML config; relative paths are relative to the config file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
        for key, value in (overrides or {}).items():
            if value is not None:
                data[key] = value
        config = MILRunConfig.model_validate(data)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the config: {error}") from error
    except ValidationError as error:
        raise ConfigError(f"{path}: {validation_problems(error)}") from error
    base = path.parent
    return config.model_copy(update={
        "labels": config.labels if config.labels.is_absolute() else base / config.labels,
        "features": config.features if config.features.is_absolute() else
        base / config.features})


def store_path(features: Path, backbone: str, slide_id: str) -> Path:
    """Where ``slidepipe extract`` put the features of ``slide_id``."""
    return features / slide_id / f"features_{backbone_tag(backbone)}.zarr"


def feature_provenance(attrs: dict[str, Any]) -> dict[str, Any]:
    """The part of a store's provenance that decides whether a model applies to it."""
    grid = attrs.get("grid", {})
    return {"backbone": attrs.get("backbone"), "weights_hash": attrs.get("weights_hash"),
            "feature_dim": attrs.get("feature_dim"), "target_mpp": grid.get("target_mpp"),
            "patch_size": grid.get("patch_size")}


def check_stores(table: LabelTable, config: MILRunConfig) -> dict[str, Any]:
    """Every slide has complete features made the same way; returns their provenance."""
    missing, seen = [], {}
    for row in table.rows:
        try:
            store = open_features(store_path(config.features, config.backbone, row["slide_id"]))
        except (FeatureStoreError, FileNotFoundError) as error:
            missing.append(f"{row['slide_id']} ({type(error).__name__})")
            continue
        seen[row["slide_id"]] = feature_provenance(store.attrs)
    if missing:
        raise ConfigError(f"{len(missing)} slide(s) have no complete {config.backbone} features "
                          f"in {config.features}: {', '.join(missing[:10])}; run slidepipe "
                          "extract first")
    kinds = {json.dumps(p, sort_keys=True) for p in seen.values()}
    if len(kinds) > 1:
        raise ConfigError(f"features of different origins in {config.features}: "
                          f"{sorted(kinds)}; re-extract them with one backbone and grid")
    return next(iter(seen.values()))


def make_folds(table: LabelTable, config: MILRunConfig) -> list[Fold]:
    """The folds the configuration asks for."""
    if config.cv.mode == "fixed":
        return [fixed_split(table)]
    if config.cv.mode == "leave_one_site_out":
        return leave_one_site_out(table, site_column=config.cv.site_column, seed=config.cv.seed)
    return patient_folds(table, k=config.cv.folds, seed=config.cv.seed)


def _loader(config: MILRunConfig) -> Callable[[str], np.ndarray]:
    return lambda slide_id: open_features(
        store_path(config.features, config.backbone, slide_id)).features()


def _cases(table: LabelTable, fold: Fold, split: str, config: MILRunConfig) -> list[Case]:
    wanted = set(fold.slides(split))
    rows = [r for r in table.rows if r["slide_id"] in wanted]
    index = {name: i for i, name in enumerate(table.label_names)}
    return make_cases(rows, index, per_patient=config.case_level == "patient")


def save_checkpoint(path: Path, model: torch.nn.Module, metadata: dict[str, Any]) -> str:
    """Write a model with its metadata atomically; returns the checkpoint's hash."""
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), **metadata}, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()[:16]


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """A model saved by :func:`save_checkpoint`, its metadata and its hash."""
    data = Path(path).read_bytes()
    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    model = build_model(checkpoint["model"], checkpoint["in_dim"], checkpoint["n_classes"],
                        **checkpoint["model_options"])
    model.load_state_dict(checkpoint.pop("state_dict"))
    model.eval()
    return model, checkpoint, hashlib.sha256(data).hexdigest()[:16]


def _predict_rows(model: torch.nn.Module, dataset: BagDataset, fold: int, split: str,
                  threshold: float | None) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    _, probabilities = evaluate_loss(model, dataset, device)
    rows = []
    for case, probs in zip(dataset.cases, probabilities, strict=True):
        row = {"case_id": case.case_id, "patient_id": case.patient_id, "label": case.label,
               "fold": fold, "split": split, "threshold": threshold}
        row.update({f"prob_{i}": float(p) for i, p in enumerate(probs)})
        rows.append(row)
    return rows


def _tensorboard(folder: Path) -> Callable[[EpochLog], None]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))

    def log(row: EpochLog) -> None:
        for name in ("train_loss", "val_loss", "val_auc", "learning_rate"):
            writer.add_scalar(name, getattr(row, name), row.epoch)
        writer.flush()

    return log


def train_run(config: MILRunConfig, run_dir: Path,
              on_epoch: Callable[[int, EpochLog], None] | None = None) -> Path:
    """Cross-validate ``config`` into ``run_dir``; returns the out-of-fold predictions CSV."""
    table = read_label_table(config.labels, config.label_names)
    provenance = check_stores(table, config)
    folds = make_folds(table, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", config.model_dump(mode="json"))
    write_folds(folds, run_dir / "folds")
    load, n_classes = _loader(config), len(table.label_names)
    rows: list[dict[str, Any]] = []
    for fold in folds:
        folder = run_dir / f"fold_{fold.index}"
        folder.mkdir(exist_ok=True)
        train_set = BagDataset(_cases(table, fold, "train", config), load, seed=config.train.seed)
        val_set = BagDataset(_cases(table, fold, "val", config), load)
        test_set = BagDataset(_cases(table, fold, "test", config), load)
        board = _tensorboard(folder / "tensorboard")

        def epoch_hook(row: EpochLog, index: int = fold.index,
                       board: Callable[[EpochLog], None] = board) -> None:
            board(row)
            if on_epoch is not None:
                on_epoch(index, row)

        trained = train_model(train_set, val_set, in_dim=provenance["feature_dim"],
                              n_classes=n_classes, config=config.train,
                              log_csv=folder / "history.csv", on_epoch=epoch_hook)
        threshold = None
        val_rows = _predict_rows(trained.model, val_set, fold.index, "val", None)
        if n_classes == 2:
            threshold = choose_threshold(
                np.array([r["label"] for r in val_rows]),
                np.array([r["prob_1"] for r in val_rows]), method=config.evaluation.threshold,
                target=config.evaluation.target_sensitivity)
        save_checkpoint(folder / "model.pt", trained.model, {
            "model": config.train.model, "model_options": config.train.model_options,
            "in_dim": provenance["feature_dim"], "n_classes": n_classes,
            "label_names": list(table.label_names), "task": config.task,
            "threshold": threshold, "feature_provenance": provenance,
            "train_config": config.train.model_dump(mode="json"), "fold": fold.index,
            "best_epoch": trained.best_epoch})
        rows += [{**r, "threshold": threshold} for r in val_rows]
        rows += _predict_rows(trained.model, test_set, fold.index, "test", threshold)
    return write_csv_atomic(run_dir / "predictions_oof.csv", rows)


def ensemble_hash(model_hashes: Sequence[str]) -> str:
    """The identity of an ensemble, as ``slidepipe predict`` names its stored attention."""
    return hashlib.sha256("".join(model_hashes).encode()).hexdigest()[:16]


def ensemble(model_paths: list[Path]) -> list[tuple[torch.nn.Module, dict[str, Any], str]]:
    """Load fold models (a run folder means all its ``fold_*/model.pt``)."""
    paths: list[Path] = []
    for path in model_paths:
        paths += sorted(path.glob("fold_*/model.pt")) if path.is_dir() else [path]
    if not paths:
        raise ConfigError(f"no models found in {', '.join(map(str, model_paths))}")
    return [load_checkpoint(p) for p in paths]


def predict_slides(model_paths: list[Path], features: Path, slide_ids: list[str],
                   out_csv: Path, device: str = "auto") -> Path:
    """Apply the (ensemble of) models to each slide's store: class probabilities averaged over
    models, the predicted class, and the mean attention written into the store as
    ``attention_<ensemble hash>`` (per patch, per class where the model has it)."""
    models = ensemble(model_paths)
    reference = models[0][1]
    torch_device = resolve_device(device)
    identity = ensemble_hash([h for _, _, h in models])
    rows = []
    for slide_id in slide_ids:
        path = store_path(features, reference["feature_provenance"]["backbone"], slide_id)
        store = open_features(path)
        found = feature_provenance(store.attrs)
        for _, metadata, model_hash in models:
            if found != metadata["feature_provenance"]:
                raise ConfigError(
                    f"{path}: features made with {found}, but model {model_hash} was trained on "
                    f"{metadata['feature_provenance']}; re-extract with the model's backbone "
                    "and grid")
        bag = torch.from_numpy(store.features())[None].to(torch_device)
        probabilities, attention = [], []
        with torch.inference_mode():
            for model, _, _ in models:
                probs, att = model.to(torch_device).predict(bag)
                probabilities.append(probs[0].float().cpu().numpy())
                attention.append(att[0].float().cpu().numpy())
        mean_probs, mean_att = np.mean(probabilities, 0), np.mean(attention, 0)
        write_attention(path, f"attention_{identity}", mean_att,
                        {"models": [h for _, _, h in models],
                         "label_names": reference["label_names"]})
        predicted = int(np.argmax(mean_probs))
        threshold = reference.get("threshold")
        if threshold is not None and len(mean_probs) == 2:
            predicted = int(mean_probs[1] >= np.mean([m["threshold"] for _, m, _ in models]))
        row = {"slide_id": slide_id, "predicted": reference["label_names"][predicted],
               "model_hash": identity, "attention": f"attention_{identity}"}
        row.update({f"prob_{name}": float(p)
                    for name, p in zip(reference["label_names"], mean_probs, strict=True)})
        rows.append(row)
    return write_csv_atomic(out_csv, rows)


def write_attention(store: Path, name: str, values: np.ndarray,
                    attributes: dict[str, Any]) -> None:
    """Store per-patch attention (N,) or (C, N) beside a store's features, for heatmaps."""
    import zarr

    group = zarr.open_group(store, mode="a", zarr_format=3)
    array = group.create_array(name, data=np.asarray(values, dtype=np.float32), overwrite=True)
    array.attrs.update(attributes)

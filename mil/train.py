"""Training one MIL model on one split: AdamW with a cosine schedule, class weighting or
balanced sampling, early stopping on validation loss or AUC, seeded, logged per epoch.

The caller owns folds, files and the user interface; this module only needs datasets and a
configuration, and returns the best model with its history.
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, WeightedRandomSampler

from .data import BagDataset, collate_bags
from .evaluation.metrics import macro_ovr_auc, roc_auc
from .models import MILModel, build_model


class TrainConfig(BaseModel):
    """How a model is trained (the ``train:`` section of a MIL config)."""

    model_config = ConfigDict(extra="forbid")

    model: str = "abmil"
    model_options: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(40, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(1, ge=1, description="bags per optimisation step (padded)")
    patience: int = Field(10, ge=1, description="epochs without improvement before stopping")
    monitor: Literal["val_loss", "val_auc"] = "val_loss"
    class_balance: Literal["none", "weighted_loss", "balanced_sampler"] = "weighted_loss"
    max_instances: int | None = Field(
        8192, ge=1, description="random instances per bag per epoch in training (None: all)")
    seed: int = 0
    device: str = Field("auto", description="auto: cuda when available, else cpu")


@dataclass
class EpochLog:
    """One row of the training log."""

    epoch: int
    train_loss: float
    val_loss: float
    val_auc: float
    learning_rate: float
    best: bool


@dataclass
class TrainedModel:
    """The best model of a run (by the monitored metric) and the run's history."""

    model: MILModel
    history: list[EpochLog]
    best_epoch: int


def resolve_device(requested: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def multiclass_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary AUC, or macro one-vs-rest AUC; NaN when it is undefined (a class missing)."""
    if probabilities.shape[1] == 2:
        return roc_auc(labels == 1, probabilities[:, 1])
    return macro_ovr_auc(labels, probabilities)


def _class_counts(dataset: BagDataset, n_classes: int) -> np.ndarray:
    return np.bincount([case.label for case in dataset.cases], minlength=n_classes)


def _loader(dataset: BagDataset, config: TrainConfig, n_classes: int, train: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed)
    sampler = None
    if train and config.class_balance == "balanced_sampler":
        counts = _class_counts(dataset, n_classes).astype(float)
        weights = [1.0 / counts[case.label] for case in dataset.cases]
        sampler = WeightedRandomSampler(weights, len(weights), generator=generator)
    return DataLoader(dataset, batch_size=config.batch_size if train else 1,
                      shuffle=train and sampler is None, sampler=sampler,
                      collate_fn=collate_bags, generator=generator)


@torch.inference_mode()
def evaluate_loss(model: MILModel, dataset: BagDataset, device: torch.device,
                  class_weights: torch.Tensor | None = None) -> tuple[float, np.ndarray]:
    """Mean bag loss and the class probabilities of every case (in dataset order)."""
    model.eval()
    losses, probabilities = [], []
    for index in range(len(dataset)):
        features, label, _ = dataset[index]
        labels = torch.tensor([label], device=device)
        output = model(features[None].to(device))
        losses.append(float(torch.nn.functional.cross_entropy(
            output.logits.float(), labels, weight=class_weights)))
        probabilities.append(torch.softmax(output.logits.float(), dim=1)[0].cpu().numpy())
    return float(np.mean(losses)), np.stack(probabilities)


def train_model(train_set: BagDataset, val_set: BagDataset, *, in_dim: int, n_classes: int,
                config: TrainConfig, log_csv: Path | None = None,
                on_epoch: Callable[[EpochLog], None] | None = None) -> TrainedModel:
    """Train with early stopping; returns the model of the best validation epoch."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = resolve_device(config.device)
    model = build_model(config.model, in_dim, n_classes, **config.model_options).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.epochs)
    class_weights = None
    if config.class_balance == "weighted_loss":
        counts = np.maximum(_class_counts(train_set, n_classes), 1).astype(np.float32)
        class_weights = torch.tensor(counts.sum() / (n_classes * counts), device=device)
    train_set.max_instances = config.max_instances
    loader = _loader(train_set, config, n_classes, train=True)
    val_labels = np.array([case.label for case in val_set.cases])
    history: list[EpochLog] = []
    best_score, best_state, best_epoch, stale = math.inf, None, 0, 0
    for epoch in range(config.epochs):
        train_set.set_epoch(epoch)
        model.train()
        epoch_losses = []
        for features, mask, labels, _ in loader:
            features, mask, labels = features.to(device), mask.to(device), labels.to(device)
            output = model(features, mask, labels=labels)
            loss = model.compute_loss(output, labels, class_weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            epoch_losses.append(float(loss.detach()))
        rate = optimiser.param_groups[0]["lr"]
        schedule.step()
        val_loss, val_probabilities = evaluate_loss(model, val_set, device, class_weights)
        val_auc = multiclass_auc(val_labels, val_probabilities)
        score = val_loss if config.monitor == "val_loss" else -np.nan_to_num(val_auc, nan=0.0)
        improved = score < best_score
        if improved:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        row = EpochLog(epoch, float(np.mean(epoch_losses)), val_loss, val_auc, rate, improved)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if stale >= config.patience:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    if log_csv is not None:
        _write_history(log_csv, history)
    return TrainedModel(model=model, history=history, best_epoch=best_epoch)


def _write_history(path: Path, history: list[EpochLog]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(history[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in history)

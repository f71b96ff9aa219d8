"""Bags of patch features for MIL: cases, datasets, padding and instance subsampling.

``mil`` does not know how features are stored: callers hand a ``load`` function that returns
the ``(N, D)`` features of a slide (``pipelines`` passes its lazy feature-store reader). A case
is one slide, or one patient when several slides of a patient form one case (their instances
are concatenated).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

FeatureLoader = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class Case:
    """One unit of prediction: its id, label index, and the slides whose instances it holds."""

    case_id: str
    label: int
    slide_ids: tuple[str, ...]
    patient_id: str


def make_cases(rows: Sequence[dict[str, str]], label_index: dict[str, int],
               per_patient: bool = False) -> list[Case]:
    """Cases from label-table rows (``slide_id, patient_id, label``); with ``per_patient``
    the slides of a patient form one case (its label: the most severe, i.e. highest index)."""
    if not per_patient:
        return [Case(r["slide_id"], label_index[r["label"]], (r["slide_id"],), r["patient_id"])
                for r in rows]
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        grouped.setdefault(row["patient_id"], []).append(row)
    return [Case(patient, max(label_index[r["label"]] for r in members),
                 tuple(r["slide_id"] for r in members), patient)
            for patient, members in grouped.items()]


class BagDataset(Dataset):
    """Bags of features per case, optionally subsampled to ``max_instances`` (random per call,
    seeded per epoch with :meth:`set_epoch`) for huge bags during training."""

    def __init__(self, cases: Sequence[Case], load: FeatureLoader,
                 max_instances: int | None = None, seed: int = 0,
                 cache: bool = True) -> None:
        self.cases = list(cases)
        self._load = load
        self.max_instances = max_instances
        self.seed = seed
        self.epoch = 0
        self._cache: dict[str, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.cases)

    def set_epoch(self, epoch: int) -> None:
        """Change the subsampling draw (the same epoch always draws the same instances)."""
        self.epoch = epoch

    def features(self, case: Case) -> np.ndarray:
        """All instances of ``case`` as float32 (N, D)."""
        parts = []
        for slide_id in case.slide_ids:
            if self._cache is not None and slide_id in self._cache:
                parts.append(self._cache[slide_id])
                continue
            values = np.asarray(self._load(slide_id), dtype=np.float32)
            if values.ndim != 2:
                raise ValueError(f"{slide_id}: features must be (N, D), got {values.shape}")
            if self._cache is not None:
                self._cache[slide_id] = values
            parts.append(values)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        case = self.cases[index]
        values = self.features(case)
        if self.max_instances is not None and len(values) > self.max_instances:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            keep = np.sort(rng.choice(len(values), self.max_instances, replace=False))
            values = values[keep]
        return torch.from_numpy(values), case.label, case.case_id


def collate_bags(items: Sequence[tuple[torch.Tensor, int, str]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Pad bags to the longest: features (B, N, D), mask (B, N) (True = real instance),
    labels (B,), case ids."""
    if len(items) == 1:   # nothing to pad: a view, not a copy of a possibly huge bag
        batch = items[0][0][None]
        mask = torch.ones(batch.shape[:2], dtype=torch.bool)
    else:
        longest = max(len(features) for features, _, _ in items)
        batch = torch.zeros(len(items), longest, items[0][0].shape[1])
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        for row, (features, _, _) in enumerate(items):
            batch[row, :len(features)] = features
            mask[row, :len(features)] = True
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.long)
    return batch, mask, labels, [case_id for _, _, case_id in items]

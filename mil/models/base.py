"""The interface every MIL model implements, and the masking helpers they share.

A *bag* is a set of instance feature vectors (the patches of a slide, the slices of a study).
Bags of different sizes are batched by padding them to a common length ``N`` and passing a
boolean ``mask`` that is ``True`` on real instances. Every model in :mod:`mil.models` obeys the
same contract:

* padded positions never influence a bag's outputs: their features are zeroed on entry and
  they receive exactly zero attention;
* ``attention`` is normalised over the valid instances of each bag (it sums to one per bag,
  and per class for models with per-class attention), so it can be rasterised into a heatmap
  without further processing;
* ``compute_loss`` adds whatever model-specific term the model trains with to the bag-level
  (optionally class-weighted) cross-entropy, so a training loop needs no per-model branches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MILModel", "MILOutput", "bag_cross_entropy", "masked_softmax", "prepare_bags"]


@dataclass
class MILOutput:
    """What a MIL model returns for a batch of ``B`` bags padded to ``N`` instances.

    Attributes:
        logits: ``(B, C)`` unnormalised class scores.
        attention: ``(B, N)`` for single-branch models or ``(B, C, N)`` for models with one
            attention branch per class; non-negative, summing to one over each bag's valid
            instances, exactly zero on padded positions.
        extra: model-specific tensors, e.g. CLAM's ``instance_loss``, ``instance_logits`` and
            ``instance_targets`` (present only when the model computed them).
    """

    logits: torch.Tensor
    attention: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def prepare_bags(features: torch.Tensor,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a padded batch and return ``(features with padding zeroed, boolean mask)``.

    Args:
        features: ``(B, N, D)`` floating-point instance features.
        mask: ``(B, N)`` with ``True`` (or non-zero) on real instances, or ``None`` when every
            position is a real instance.

    Raises:
        ValueError: on a wrong shape or dtype, or a bag without any valid instance.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, D); got shape {tuple(features.shape)} "
                         "(add a batch dimension with features[None] for a single bag)")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point; got {features.dtype}")
    batch, length, _ = features.shape
    if length == 0:
        raise ValueError("bags must hold at least one instance; got N = 0")
    if mask is None:
        return features, torch.ones(batch, length, dtype=torch.bool, device=features.device)
    if mask.shape != (batch, length):
        raise ValueError(f"mask must be (B, N) = {(batch, length)}; got {tuple(mask.shape)}")
    mask = mask.to(device=features.device, dtype=torch.bool)
    if not bool(mask.any(dim=1).all()):
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"bags {empty} have no valid instance (mask all False); drop them "
                         "before batching")
    if bool(mask.all()):   # no padding: spare a copy of the whole batch
        return features, mask
    return features.masked_fill(~mask.unsqueeze(-1), 0.0), mask


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension restricted to ``mask``; masked positions get exactly 0.

    Computed in float32 (scores from mixed precision are upcast) with the usual max
    subtraction, so it is stable for bags of any length. ``mask`` broadcasts against
    ``scores`` (e.g. ``(B, 1, N)`` against ``(B, K, N)``).
    """
    scores = scores.float().masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights.masked_fill(~mask, 0.0)


class MILModel(nn.Module, ABC):
    """Base class of every slidepipe MIL model (one model per module, one interface).

    Subclasses implement :meth:`forward`; :meth:`compute_loss` defaults to the bag-level
    cross-entropy and is extended by models that train with an extra term.
    """

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1; got {in_dim}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2; got {n_classes}")
        self.in_dim = in_dim
        self.n_classes = n_classes

    @abstractmethod
    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None) -> MILOutput:
        """Score a padded batch of bags.

        Args:
            features: ``(B, N, D)`` instance features.
            mask: ``(B, N)`` boolean, ``True`` on real instances; ``None`` means all real.
            labels: ``(B,)`` class indices; only models whose training needs them use them
                (CLAM's instance clustering, in training mode only).
        """

    def compute_loss(self, output: MILOutput, labels: torch.Tensor,
                     class_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Bag-level cross-entropy, weighted per class when ``class_weights`` (C,) is given."""
        return bag_cross_entropy(output.logits, labels, class_weights)

    @torch.no_grad()
    def predict(self, features: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities ``(B, C)`` and attention, computed in eval mode without gradients.

        The module's training flag is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            output = self(features, mask)
        finally:
            self.train(was_training)
        return torch.softmax(output.logits.float(), dim=-1), output.attention

    def _check_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        """Labels as a ``(B,)`` long tensor of valid class indices."""
        if labels.shape != (batch,):
            raise ValueError(f"labels must be (B,) = ({batch},); got {tuple(labels.shape)}")
        labels = labels.long()
        if bool(((labels < 0) | (labels >= self.n_classes)).any()):
            raise ValueError(f"labels must lie in [0, {self.n_classes}); got {labels.tolist()}")
        return labels


def bag_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``(B, C)`` logits against ``(B,)`` labels, in float32."""
    weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    return F.cross_entropy(logits.float(), labels.long(), weight=weight)

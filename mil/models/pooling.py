"""Mean- and max-pooling MIL baselines.

Each instance is embedded by a small MLP (``Linear -> ReLU -> Dropout``), the embeddings are
pooled over the bag's valid instances (masked mean or masked element-wise max) and a linear
classifier maps the pooled vector to logits. Both are permutation invariant.

Their ``attention`` is each instance's contribution to the pooled vector, normalised to sum
to one over the valid instances:

* mean pool: uniform, ``1 / n`` on every valid instance;
* max pool: the fraction of embedding dimensions in which the instance attains the maximum.
  A dimension where several instances tie for the maximum (e.g. all zero after the ReLU) is
  shared equally among them, which keeps the attention exactly permutation equivariant.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from .base import MILModel, MILOutput, prepare_bags
from .layers import instance_embedding

__all__ = ["MaxPoolMIL", "MeanPoolMIL"]


class _PoolingMIL(MILModel):
    """Instance MLP, a pooling operator (defined by the subclass) and a linear classifier.

    Args:
        in_dim: instance feature size. n_classes: number of classes.
        embed_dim: size of the instance embedding.
        dropout: dropout after the instance embedding.
    """

    def __init__(self, in_dim: int, n_classes: int, *, embed_dim: int = 256,
                 dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_classes)
        self.embedding = instance_embedding(in_dim, embed_dim, dropout)
        self.classifier = nn.Linear(embed_dim, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None) -> MILOutput:
        """Logits ``(B, C)`` and contribution-based attention ``(B, N)``; ``labels`` unused."""
        features, mask = prepare_bags(features, mask)
        embeddings = self.embedding(features)                      # (B, N, H)
        pooled, attention = self._pool(embeddings, mask)
        return MILOutput(logits=self.classifier(pooled), attention=attention)

    @abstractmethod
    def _pool(self, embeddings: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embeddings ``(B, H)`` and normalised contributions ``(B, N)``."""


class MeanPoolMIL(_PoolingMIL):
    """Masked mean over the instance embeddings; uniform attention."""

    def _pool(self, embeddings: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = mask.float() / mask.sum(dim=1, keepdim=True).float()   # (B, N)
        pooled = torch.bmm(weights.unsqueeze(1).to(embeddings.dtype), embeddings)[:, 0]
        return pooled, weights


class MaxPoolMIL(_PoolingMIL):
    """Masked element-wise max over the instance embeddings; arg-max share as attention."""

    def _pool(self, embeddings: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = mask.unsqueeze(-1)                                       # (B, N, 1)
        masked = embeddings.masked_fill(~valid, float("-inf"))
        pooled = masked.amax(dim=1)                                      # (B, H)
        winners = (masked == pooled.unsqueeze(1)) & valid                # (B, N, H)
        shares = winners.float() / winners.sum(dim=1, keepdim=True).float()
        attention = shares.mean(dim=-1)                                  # (B, N), sums to 1
        return pooled, attention

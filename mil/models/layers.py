"""Building blocks shared by several models: the instance embedding and attention scorers.

These are layers, not models: each model module composes them and owns its own forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AttentionScorer", "instance_embedding"]


def instance_embedding(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """``Linear -> ReLU -> Dropout``: the per-instance embedding of the attention models."""
    if out_dim < 1:
        raise ValueError(f"embedding size must be >= 1; got {out_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))


class AttentionScorer(nn.Module):
    """Unnormalised attention scores of Ilse et al. (2018), with ``n_branches`` output heads.

    Plain: ``s_k = wᵀ tanh(V h_k)``. Gated: ``s_k = wᵀ (tanh(V h_k) ⊙ sigm(U h_k))``. With
    ``n_branches > 1`` there is one ``w`` per branch (CLAM-MB: one branch per class), sharing
    ``V`` and ``U``. The softmax over instances is left to the caller, which knows the mask.
    """

    def __init__(self, in_dim: int, attention_dim: int, *, n_branches: int = 1,
                 gated: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if attention_dim < 1 or n_branches < 1:
            raise ValueError("attention_dim and n_branches must be >= 1; got "
                             f"{attention_dim} and {n_branches}")
        self.gated = gated
        self.n_branches = n_branches
        self.tanh_branch = nn.Sequential(nn.Linear(in_dim, attention_dim), nn.Tanh())
        self.gate = (nn.Sequential(nn.Linear(in_dim, attention_dim), nn.Sigmoid())
                     if gated else None)
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Linear(attention_dim, n_branches)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, n_branches, N)`` for embeddings ``(B, N, H)``."""
        hidden = self.tanh_branch(embeddings)
        if self.gate is not None:
            hidden = hidden * self.gate(embeddings)
        return self.weight(self.dropout(hidden)).transpose(1, 2)

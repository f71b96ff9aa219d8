"""Nyström self-attention (Xiong et al., AAAI 2021), the attention layer of TransMIL.

Softmax attention ``softmax(Q Kᵀ) V`` costs O(n²). Nyström attention picks ``m`` landmarks
``Q̃``, ``K̃`` (means of ``m`` contiguous segments of the queries and keys) and approximates

    softmax(Q Kᵀ) ≈ softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ)

(all logits scaled by ``1/√d_head``), evaluated right to left so that no ``n × n`` matrix is
ever formed: time and memory are O(n·m). The pseudo-inverse is the iterative Moore-Penrose
approximation of Razavi et al. (2014) used in the paper,
``Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))`` from ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)``. A depth-wise
convolution of the values along the sequence is added as the paper's skip connection.

Sequences no longer than ``m`` use exact softmax attention (the cheaper and exact choice).
The core runs in float32 even under mixed precision, because the pseudo-inverse iteration is
not stable in half precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AttentionMap", "NystromAttention", "iterative_pinv", "segment_means"]


def segment_means(x: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Means of ``n_segments`` contiguous, near-equal segments along dim -2 of ``(..., n, d)``.

    Requires ``n >= n_segments``; segment ``j`` holds positions ``i`` with
    ``floor(i * n_segments / n) == j``, so every segment is non-empty without any padding.
    """
    n = x.shape[-2]
    segment = torch.arange(n, device=x.device) * n_segments // n
    sums = x.new_zeros(*x.shape[:-2], n_segments, x.shape[-1]).index_add(-2, segment, x)
    counts = torch.bincount(segment, minlength=n_segments).to(x.dtype)
    return sums / counts.unsqueeze(-1)


def iterative_pinv(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """Approximate Moore-Penrose pseudo-inverse of a batch of square matrices ``(..., m, m)``."""
    magnitude = matrix.abs()
    scale = magnitude.sum(-1).amax(-1) * magnitude.sum(-2).amax(-1)
    inverse = matrix.transpose(-1, -2) / scale[..., None, None]
    identity = torch.eye(matrix.shape[-1], device=matrix.device, dtype=matrix.dtype)
    for _ in range(iterations):
        product = matrix @ inverse
        inverse = 0.25 * inverse @ (13 * identity - product @ (
            15 * identity - product @ (7 * identity - product)))
    return inverse


@dataclass(frozen=True)
class AttentionMap:
    """A head-averaged ``n × n`` attention matrix ``A``, exact or as Nyström factors.

    ``factors`` is ``(weights,)`` with ``weights`` ``(h, n, n)`` for exact attention, or
    ``(kernel_1 (h, n, m), pinv (h, m, m), kernel_3 (h, m, n))`` with
    ``A_h = kernel_1 · pinv · kernel_3``. Rows and vector products are evaluated right through
    the factors in O(h·n·m) without forming ``A``. Nyström rows sum to ~1 and may hold small
    negative entries.
    """

    factors: tuple[torch.Tensor, ...]

    def row(self, index: int) -> torch.Tensor:
        """Row ``index`` of ``A`` (how token ``index`` attends to all tokens), ``(n,)``."""
        one_hot = torch.zeros(self.factors[-1].shape[-1], device=self.factors[0].device)
        one_hot[index] = 1.0
        return self.left_multiply(one_hot)

    def left_multiply(self, weights: torch.Tensor) -> torch.Tensor:
        """``weightsᵀ · A`` for a vector ``weights`` ``(n,)``, returned as float32 ``(n,)``."""
        with torch.autocast(device_type=weights.device.type, enabled=False):
            weights = weights.float().unsqueeze(0)                       # (1, n)
            if len(self.factors) == 1:
                return (weights @ self.factors[0])[:, 0].mean(0)
            kernel_1, inverse, kernel_3 = self.factors
            return ((weights @ kernel_1) @ inverse @ kernel_3)[:, 0].mean(0)


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention over one sequence ``(n, dim)``.

    Args:
        dim: token size; must be divisible by ``n_heads``.
        n_heads: number of attention heads.
        n_landmarks: number of landmarks ``m``.
        pinv_iterations: iterations of the pseudo-inverse approximation.
        residual_kernel: kernel of the depth-wise value convolution (odd; 0 disables it).
        dropout: dropout on the output projection.
        global_tokens: number of leading tokens that are not sequence elements (a class
            token): they attend and are attended as usual but the value convolution, a
            sequence operation, skips them (they neither feed it nor receive from it).
    """

    def __init__(self, dim: int, *, n_heads: int = 8, n_landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int = 33,
                 dropout: float = 0.1, global_tokens: int = 0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} must be divisible by n_heads {n_heads}")
        if n_landmarks < 1 or pinv_iterations < 1:
            raise ValueError("n_landmarks and pinv_iterations must be >= 1; got "
                             f"{n_landmarks} and {pinv_iterations}")
        if residual_kernel < 0 or (residual_kernel and residual_kernel % 2 == 0):
            raise ValueError(f"residual_kernel must be 0 or odd; got {residual_kernel}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.n_landmarks = n_landmarks
        self.pinv_iterations = pinv_iterations
        self.global_tokens = global_tokens
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.output = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.residual = (nn.Conv2d(n_heads, n_heads, (residual_kernel, 1),
                                   padding=(residual_kernel // 2, 0), groups=n_heads,
                                   bias=False) if residual_kernel else None)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, AttentionMap]:
        """Attend over ``tokens`` ``(n, dim)``; return the output ``(n, dim)`` and the map.

        The :class:`AttentionMap` holds the (detached) attention matrix, exact or in Nyström
        factors; the value-convolution skip path is not part of it.
        """
        n, dim = tokens.shape
        qkv = self.qkv(tokens).view(n, 3, self.n_heads, self.head_dim).permute(1, 2, 0, 3)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            query, key, value = (part.float() for part in qkv)           # (h, n, d_head)
            query = query * self.head_dim ** -0.5
            if n <= self.n_landmarks:
                weights = torch.softmax(query @ key.transpose(-1, -2), dim=-1)
                attended = weights @ value
                attention_map = AttentionMap((weights.detach(),))
            else:
                attended, attention_map = self._nystrom(query, key, value)
            if self.residual is not None:
                first = self.global_tokens
                skip = self.residual(value[:, first:].unsqueeze(0)).squeeze(0)
                attended = torch.cat([attended[:, :first], attended[:, first:] + skip], dim=1)
        merged = attended.to(tokens.dtype).transpose(0, 1).reshape(n, dim)
        return self.output(merged), attention_map

    def _nystrom(self, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[torch.Tensor, AttentionMap]:
        query_landmarks = segment_means(query, self.n_landmarks)          # (h, m, d_head)
        key_landmarks = segment_means(key, self.n_landmarks)
        kernel_1 = torch.softmax(query @ key_landmarks.transpose(-1, -2), dim=-1)      # (h, n, m)
        kernel_2 = torch.softmax(query_landmarks @ key_landmarks.transpose(-1, -2), dim=-1)
        kernel_3 = torch.softmax(query_landmarks @ key.transpose(-1, -2), dim=-1)      # (h, m, n)
        inverse = iterative_pinv(kernel_2, self.pinv_iterations)         # (h, m, m)
        attended = kernel_1 @ (inverse @ (kernel_3 @ value))
        factors = (kernel_1.detach(), inverse.detach(), kernel_3.detach())
        return attended, AttentionMap(factors)

"""`ClassifierHead`: pool `Tokens` and classify."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from timm.layers import trunc_normal_
from torch import nn

from tokenizers_mm import Tokens

from .registry import register_head

__all__ = ["ClassifierHead", "POOLING", "Pooling", "pool_tokens"]

Pooling = Literal["cls", "mean", "last", "cls+max"]
POOLING: tuple[str, ...] = get_args(Pooling)


def pool_tokens(tokens: Tokens, pool: Pooling) -> torch.Tensor:
    """One vector per sample from `tokens` ``[B, N, D]``: ``[B, D]`` (``[B, 2D]`` for ``cls+max``); see `POOLING`."""
    x, mask = tokens.x, tokens.mask
    if pool in ("cls", "cls+max") and tokens.num_prefix < 1:
        raise ValueError(f"pool={pool!r} needs a cls token (num_prefix >= 1), got num_prefix=0")
    if pool == "last":
        if mask is None:
            return x[:, -1]
        last = mask.long().cumsum(1).argmax(1)  # index of the last real token
        return x[torch.arange(x.shape[0], device=x.device), last]
    if pool == "cls":
        return x[:, 0]
    grid, gmask = tokens.grid_tokens(), tokens.grid_mask()
    if pool == "mean":
        if gmask is None:
            return grid.mean(1)
        w = gmask.unsqueeze(-1).to(grid.dtype)
        return (grid * w).sum(1) / w.sum(1).clamp_min(1.0)
    if gmask is not None:
        grid = grid.masked_fill(~gmask.unsqueeze(-1), torch.finfo(grid.dtype).min)
    return torch.cat([x[:, 0], grid.amax(1)], dim=-1)


@register_head("classifier")
class ClassifierHead(nn.Module):
    """Pooling + dropout + linear classifier.

    Pooling: ``cls`` (first token, ViT / the center paper), ``mean`` (mean of the grid tokens, padding excluded),
    ``last`` (the last real token: a causal ViT's post-sequence cls, FPT's readout), ``cls+max`` (the cls token
    concatenated with the max over grid tokens). ``Tokens [B, N, D] -> logits [B, num_classes]``.
    """

    def __init__(self, in_dim: int, num_classes: int, pool: Pooling = "cls", dropout: float = 0.0):
        super().__init__()
        if pool not in POOLING:
            raise ValueError(f"pool must be one of {POOLING}, got {pool!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.pool, self.in_dim, self.num_classes = pool, in_dim, num_classes
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim * (2 if pool == "cls+max" else 1), num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def pool_tokens(self, tokens: Tokens) -> torch.Tensor:
        """``[B, N, D] -> [B, D]`` (``[B, 2D]`` for ``cls+max``)."""
        return pool_tokens(tokens, self.pool)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        if tokens.dim != self.in_dim:
            raise ValueError(f"ClassifierHead expects width {self.in_dim}, got {tokens.dim}")
        return self.fc(self.drop(self.pool_tokens(tokens)))

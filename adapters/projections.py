"""Token-count-preserving projections: `linear` (the center paper's mappers) and `mlp` (LLaVA's projector)."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from .base import Adapter
from .registry import register_adapter

__all__ = ["LinearAdapter", "MLPAdapter"]


def _init_linear(m: nn.Linear, std: float) -> None:
    trunc_normal_(m.weight, std=std)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


@register_adapter("linear")
class LinearAdapter(Adapter):
    """``Linear(in_dim, out_dim)`` per token. The center paper uses ``bias=False`` on both sides of the LLM block,
    trunc-normal(0.02) initialised. Shape: ``[B, N, in_dim] -> [B, N, out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False, init_std: float = 0.02):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)
        _init_linear(self.proj, init_std)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@register_adapter("mlp")
class MLPAdapter(Adapter):
    """LLaVA's projector: ``Linear -> GELU -> Linear`` (``depth`` linears in all).

    Args:
        hidden_dim: width of the hidden layers (default: ``out_dim``).
        depth: number of linear layers (>= 1; 2 is LLaVA-1.5's ``mlp2x_gelu``).
        bias: biases on the linears.
    Shape: ``[B, N, in_dim] -> [B, N, out_dim]``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int | None = None,
        depth: int = 2,
        bias: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp adapter depth must be >= 1, got {depth}")
        self.in_dim, self.out_dim = in_dim, out_dim
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
            if i < depth - 1:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                _init_linear(m, init_std)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

"""Norm helpers: the parameter-free RMS norm of the center paper and norm-module detection."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UnitRMSNorm", "is_norm_module", "open_norm_parameters"]


class UnitRMSNorm(nn.Module):
    """Parameter-free RMS normalisation ``x / sqrt(mean(x^2) + eps)`` (an RMSNorm with weight fixed to 1).

    The center paper follows its frozen LLaMA block with a fresh, frozen, unit-weight RMSNorm rather than the
    checkpoint's final norm. Computed in float32 like the LLM norms. Shape: ``[..., D] -> [..., D]``.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def open_norm_parameters(*modules: nn.Module) -> None:
    """Make the norm weights (and biases) below `modules` trainable: the FPT / ``tune="norm"`` setting."""
    for root in modules:
        for m in root.modules():
            if is_norm_module(m):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)


def is_norm_module(module: nn.Module) -> bool:
    """True for LayerNorm / RMSNorm-like modules, including each architecture's own norm classes."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    name = type(module).__name__
    return name.endswith(("RMSNorm", "LayerNorm", "LayerNorm1P")) or name in {"Norm", "RMSNorm", "LayerNorm"}

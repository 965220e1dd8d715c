"""Helpers the oracle tests share: randomising every parameter of a model, and the documented linear resize."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0, vector_scale: float = 0.1) -> nn.Module:
    """Every parameter random, biases included (HF zero-inits conv and q/v biases, so a dropped one would go
    unnoticed): norm weights ``1 + 0.1 N``, matrices ``0.15 N``, vectors ``vector_scale N``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.rsplit(".", 1)[0] and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((0.15 if p.dim() > 1 else vector_scale) * noise)
    return model


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` 1-D linear resampling with ``align_corners=False`` (as `torch.nn.functional.interpolate`
    documents it): output ``i`` samples source coordinate ``(i + 0.5) * n_in / n_out - 0.5`` (clamped at 0),
    interpolating its two neighbours (the last one repeated at the far edge)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, min(i0 + 1, n_in - 1)] += lam
    return m

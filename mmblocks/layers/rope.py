"""Axial rotary position embeddings over `Tokens.pos` (VisionLLaMA's 2-D RoPE, generalised to 1-3 axes).

Layout. Every function returns ``(cos, sin)`` of shape ``[B, N, dim]`` in `transformers`' *rotate_half* layout:
channel ``i`` and channel ``i + dim/2`` form one rotation pair with angle ``angle[..., i]``, so
``cos = cat(cos(angle), cos(angle))``. HF decoder layers take it as ``position_embeddings=(cos, sin)`` and
`apply_rotary` below applies it the same way (``x * cos + rotate_half(x) * sin``).

Frequencies (VisionLLaMA, ``precompute_freqs_cis_2d``). With ``P`` position axes, rotation pair
``i = m * P + a`` rotates by ``pos[..., a] * theta ** (-2 * P * m / dim)``: the axes are interleaved pair by pair
and each axis gets ``dim / (2 * P)`` frequencies. ``P = 1`` is the standard 1-D RoPE (identical to HF's default
rotary over ``0..N-1``); ``P = 2`` is VisionLLaMA's 2-D RoPE (frequencies ``theta^{-k/dim}``, ``k = 0, 4, 8,
...``, pairs alternating between the two axes, here in `Tokens.pos` order: row, then column); ``P = 3`` covers
``(t, row, col)`` video and ``(x, y, z)`` point positions. Pairs left over when ``dim / 2`` is not a multiple of
``P`` are not rotated.

Special tokens (cls, registers: the prefix / suffix of `Tokens`, and tokens whose every coordinate equals
``special_value``, -1 by default, as `ImagePatches` marks them) get the identity rotation (cos 1, sin 0).

AS2DRoPE (VisionLLaMA's auto-scaled RoPE): with ``train_grid``, grid positions are multiplied per axis by
``train_grid / grid``, so a larger input's positions are interpolated back into the range seen in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tokenizers_mm import Tokens

__all__ = [
    "AxialRoPE",
    "apply_rotary",
    "auto_scale_positions",
    "axial_angles",
    "axial_rope",
    "grid_positions",
    "rope_inv_freq",
    "rotate_half",
    "sequence_rope",
    "special_token_mask",
]


def rope_inv_freq(dim: int, num_axes: int = 1, theta: float = 10000.0, device: torch.device | None = None):
    """``[dim // (2 * num_axes)]`` inverse frequencies ``theta ** (-2 * num_axes * m / dim)`` (float32)."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even number, got {dim}")
    if num_axes < 1:
        raise ValueError(f"num_axes must be >= 1, got {num_axes}")
    per_axis = dim // (2 * num_axes)
    if per_axis == 0:
        raise ValueError(f"rotary dim {dim} is too small for {num_axes} axes (needs at least {2 * num_axes})")
    exponent = torch.arange(per_axis, device=device, dtype=torch.float32) * (2.0 * num_axes / dim)
    return 1.0 / (float(theta) ** exponent)


def axial_angles(pos: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angle of every pair: ``pos [..., P]`` -> ``[..., dim // 2]`` (pair ``m * P + a`` rotates by
    ``pos[..., a] * inv_freq[m]``; leftover pairs 0), float32."""
    num_axes = pos.shape[-1]
    inv_freq = rope_inv_freq(dim, num_axes, theta, device=pos.device)
    angles = pos.float().unsqueeze(-2) * inv_freq[:, None]  # [..., per_axis, P]
    angles = angles.flatten(-2)  # pair m * P + a
    missing = dim // 2 - angles.shape[-1]
    if missing:
        angles = torch.cat([angles, angles.new_zeros(*angles.shape[:-1], missing)], dim=-1)
    return angles


def special_token_mask(
    pos: torch.Tensor, num_prefix: int = 0, num_suffix: int = 0, special_value: float | None = -1.0
) -> torch.Tensor:
    """``[B, N]`` bool, True for the special tokens: the first `num_prefix`, the last `num_suffix` and (unless
    `special_value` is None) every token whose coordinates all equal `special_value`."""
    b, n, _ = pos.shape
    idx = torch.arange(n, device=pos.device)
    special = (idx < num_prefix) | (idx >= n - num_suffix)
    special = special.unsqueeze(0).expand(b, n)
    if special_value is not None:
        special = special | (pos == special_value).all(-1)
    return special


def auto_scale_positions(
    pos: torch.Tensor, grid: Sequence[int] | None, train_grid: Sequence[int] | None
) -> torch.Tensor:
    """AS2DRoPE: ``pos [B, N, P]`` with axis ``a`` multiplied by ``train_grid[a] / grid[a]`` (unchanged when
    `train_grid` is None or equals `grid`)."""
    if train_grid is None:
        return pos
    train_grid = tuple(int(g) for g in train_grid)
    if grid is None:
        raise ValueError(
            f"rope auto-scaling (train_grid={train_grid}) needs the tokens' grid, but Tokens.grid is None "
            "(irregular tokens such as point groups cannot be rescaled)"
        )
    grid = tuple(int(g) for g in grid)
    if len(grid) != pos.shape[-1] or len(train_grid) != pos.shape[-1]:
        raise ValueError(
            f"rope auto-scaling: positions have {pos.shape[-1]} axes but grid={grid} and train_grid={train_grid}"
        )
    if grid == train_grid:
        return pos
    scale = torch.tensor([t / g for t, g in zip(train_grid, grid)], device=pos.device, dtype=torch.float32)
    return pos.float() * scale


def axial_rope(
    pos: torch.Tensor,
    dim: int,
    *,
    theta: float = 10000.0,
    num_prefix: int = 0,
    num_suffix: int = 0,
    special_value: float | None = -1.0,
    grid: Sequence[int] | None = None,
    train_grid: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[B, N, dim]`` (rotate_half layout) for positions ``pos [B, N, P]``.

    Args:
        pos: coordinates per token (``(row, col)``, ``(t, row, col)``, ``(x, y, z)``, ``(t,)``).
        dim: the rotated width per head (the head dim, or the rotary part of it).
        theta: base frequency (VisionLLaMA: 10000).
        num_prefix / num_suffix / special_value: which tokens are special (identity rotation), see
            `special_token_mask`.
        grid / train_grid: AS2DRoPE auto-scaling (`auto_scale_positions`); ``train_grid=None`` disables it.
        dtype: output dtype (default float32).
    """
    if pos.dim() != 3:
        raise ValueError(f"rope positions must be [B, N, P], got shape {tuple(pos.shape)}")
    special = special_token_mask(pos, num_prefix, num_suffix, special_value)
    pos = auto_scale_positions(pos, grid, train_grid)
    angles = axial_angles(pos, dim, theta).masked_fill(special.unsqueeze(-1), 0.0)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if dtype is not None:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def sequence_rope(
    n: int,
    dim: int,
    *,
    theta: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D RoPE over token order ``0..n-1`` (iLLaMA; equal to HF's default rotary): ``(cos, sin)`` ``[1, n, dim]``."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[None, :, None]
    return axial_rope(pos, dim, theta=theta, special_value=None, dtype=dtype)


def grid_positions(
    grid: Sequence[int],
    num_prefix: int = 0,
    num_suffix: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``[1, num_prefix + prod(grid) + num_suffix, len(grid)]`` row-major grid coordinates; special tokens at -1."""
    axes = [torch.arange(g, device=device, dtype=torch.float32) for g in grid]
    coords = torch.stack([c.flatten() for c in torch.meshgrid(*axes, indexing="ij")], dim=-1)
    fill = lambda k: torch.full((k, len(grid)), -1.0, device=device)  # noqa: E731
    return torch.cat([fill(num_prefix), coords, fill(num_suffix)], dim=0).unsqueeze(0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (HF's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, N, d]`` by ``cos, sin [B | 1, N, r]`` (``r <= d``: the first ``r`` channels rotate, the
    rest pass, as HF's partial rotary)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


class AxialRoPE(nn.Module):
    """`axial_rope` over `Tokens`: ``tokens -> (cos, sin) [B, N, dim]``, checking the position width.

    Args:
        dim: rotated width per head.
        num_axes: the width ``P`` `Tokens.pos` must have (2 for images, 3 for video / points, 1 for audio).
        theta: base frequency.
        train_grid: AS2DRoPE training grid (e.g. ``(14, 14)``), or None for no auto-scaling.
    """

    def __init__(self, dim: int, num_axes: int = 2, theta: float = 10000.0, train_grid: Sequence[int] | None = None):
        super().__init__()
        rope_inv_freq(dim, num_axes, theta)  # validates
        if train_grid is not None and len(train_grid) != num_axes:
            raise ValueError(f"train_grid {tuple(train_grid)} must have {num_axes} sizes")
        self.dim, self.num_axes, self.theta = dim, num_axes, float(theta)
        self.train_grid = None if train_grid is None else tuple(int(g) for g in train_grid)

    def forward(self, tokens: Tokens, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.pos is None or tokens.pos.shape[-1] != self.num_axes:
            got = None if tokens.pos is None else tuple(tokens.pos.shape)
            raise ValueError(
                f"{self.num_axes}-axis rope needs Tokens.pos [B, N, {self.num_axes}] ({tokens.modality} tokens), got "
                f"pos {got}"
            )
        return axial_rope(
            tokens.pos,
            self.dim,
            theta=self.theta,
            num_prefix=tokens.num_prefix,
            num_suffix=tokens.num_suffix,
            grid=tokens.grid,
            train_grid=self.train_grid,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_axes={self.num_axes}, theta={self.theta}, train_grid={self.train_grid}"

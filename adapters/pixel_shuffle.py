"""`pixel_shuffle`: Idefics3's connector — space-to-depth on the 2D token grid, then a linear to the LLM width."""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenizers_mm import Tokens

from .base import Adapter
from .projections import _init_linear
from .registry import register_adapter

__all__ = ["PixelShuffleAdapter", "pixel_shuffle"]


def pixel_shuffle(x: torch.Tensor, grid: tuple[int, int], scale: int) -> torch.Tensor:
    """Space-to-depth of row-major grid tokens: ``[B, H * W, D] -> [B, (H / s) * (W / s), s * s * D]``.

    Output token ``(a, b)`` (row-major over ``(H / s, W / s)``) holds the ``s x s`` block at rows ``a*s ..``,
    cols ``b*s ..``; its features are ordered (row offset i, col offset j, channel d) -> ``(i * s + j) * D + d``.
    This is exactly ``transformers``' ``Idefics3Connector.pixel_shuffle`` (which needs ``H == W``) for any
    ``H, W`` divisible by ``s``.
    """
    b, n, d = x.shape
    h, w = grid
    x = x.reshape(b, h // scale, scale, w // scale, scale, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, n // (scale * scale), scale * scale * d)


@register_adapter("pixel_shuffle")
class PixelShuffleAdapter(Adapter):
    """Idefics3's connector: `pixel_shuffle` by ``scale``, then ``Linear(in_dim * scale**2, out_dim)``.

    Args:
        scale: the space-to-depth factor ``s`` (Idefics3: 2, SmolVLM: 3-4); ``H`` and ``W`` must divide by it.
        bias: bias on the linear (Idefics3: none). init_std: its trunc-normal init std.

    Tokens: the prefix / suffix tokens (cls, registers) are dropped (Idefics3's SigLIP has none). The output grid is
    ``(H / s, W / s)`` in row-major order; ``pos`` is the mean position of the real tokens of each ``s x s`` block
    (the block centre when unmasked; the mean over the whole block when none is real).

    Mask: masked source tokens enter the stacked features as zeros, so padding never changes a block that holds a
    real token; a block is real if any of its tokens is.

    Shape: `Tokens` ``[B, P + H*W + S, in_dim]`` with a 2D grid -> `Tokens` ``[B, H*W / s**2, out_dim]``; a tensor
    ``[B, N, in_dim]`` is read as a square grid (as Idefics3 does) and gives a tensor.
    """

    changes_token_count = True

    def __init__(self, in_dim: int, out_dim: int, scale: int = 2, bias: bool = False, init_std: float = 0.02):
        super().__init__()
        if not (isinstance(scale, int) and scale >= 1):
            raise ValueError(f"pixel_shuffle scale must be an int >= 1, got {scale!r}")
        self.in_dim, self.out_dim, self.scale = in_dim, out_dim, scale
        self.proj = nn.Linear(in_dim * scale * scale, out_dim, bias=bias)
        _init_linear(self.proj, init_std)

    def output_grid(self, grid: tuple[int, ...] | None) -> tuple[int, int]:
        """``(H / s, W / s)`` for a 2D ``grid``; a clear error for any other grid."""
        if grid is None or len(grid) != 2:
            raise ValueError(f"pixel_shuffle needs a 2D (H, W) token grid, got grid={grid}")
        s = self.scale
        if grid[0] % s or grid[1] % s:
            raise ValueError(f"pixel_shuffle scale={s} needs a grid divisible by {s} on both axes, got {grid}")
        return grid[0] // s, grid[1] // s

    def num_output_tokens(self, input_tokens: int | Tokens) -> int:
        """Output count for `Tokens`, or for an int count of tokens of a square grid without special tokens."""
        if isinstance(input_tokens, Tokens):
            return math.prod(self.output_grid(input_tokens.grid))
        side = math.isqrt(input_tokens)
        if side * side != input_tokens:
            raise ValueError(f"pixel_shuffle reads an int as a square grid, but {input_tokens} is not a square")
        return math.prod(self.output_grid((side, side)))

    def forward(self, tokens: Tokens | torch.Tensor) -> Tokens | torch.Tensor:
        is_tokens = isinstance(tokens, Tokens)
        self._check(tokens.x if is_tokens else tokens)
        if not is_tokens:
            n = tokens.shape[1]
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(
                    f"pixel_shuffle reads a plain [B, N, D] tensor as a square grid, but N={n} is not a square; "
                    "pass Tokens with grid instead"
                )
            tokens = Tokens(x=tokens, grid=(side, side))
        out = self.output_grid(tokens.grid)
        grid, s = tokens.grid, self.scale
        if math.prod(grid) != tokens.num_grid_tokens:
            raise ValueError(
                f"pixel_shuffle: Tokens.grid {grid} holds {math.prod(grid)} tokens, but there are "
                f"{tokens.num_grid_tokens} grid tokens (N={tokens.num_tokens}, num_prefix={tokens.num_prefix}, "
                f"num_suffix={tokens.num_suffix})"
            )
        sl = slice(tokens.num_prefix, tokens.num_tokens - tokens.num_suffix)
        x, mask = tokens.x[:, sl], tokens.mask
        if mask is not None:
            mask = mask[:, sl]
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # not x * mask: padding may hold inf / nan
        y = self.proj(pixel_shuffle(x, grid, s))
        if not is_tokens:
            return y
        out_mask = pos = None
        if mask is not None:
            out_mask = pixel_shuffle(mask.unsqueeze(-1), grid, s).any(-1)
        if tokens.pos is not None:
            p = tokens.pos[:, sl]
            blocks = pixel_shuffle(p, grid, s).unflatten(-1, (s * s, p.shape[-1]))  # [B, n_out, s*s, P]
            pos = blocks.mean(2)
            if mask is not None:
                w = pixel_shuffle(mask.unsqueeze(-1), grid, s).to(p.dtype).unsqueeze(-1)  # [B, n_out, s*s, 1]
                real_mean = blocks.masked_fill(w == 0, 0.0).sum(2) / w.sum(2).clamp_min(1.0)
                pos = torch.where(out_mask.unsqueeze(-1), real_mean, pos)
        return Tokens(x=y, mask=out_mask, pos=pos, grid=out, modality=tokens.modality)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, scale={self.scale}"

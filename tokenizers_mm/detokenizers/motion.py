"""`motion`: motion tokens -> a per-macroblock motion field -> the keyframe warped frame by frame.

The inverse of `tokenizers_mm.motion.MotionTokens` (Video-LaVIT's motion half, without its diffusion renderer):
each token of the ``(T'', h', w')`` grid predicts the ``(dx, dy)`` of the ``t_patch x p x p`` macroblock steps it
covers (a linear head, optionally after a few transformer blocks), in the tokenizer's units (``field / scale``).
Rendering follows the sign convention of `tokenizers_mm.motion`: ``frame[t+1](q) = frame[t](q - d(q))``, with
``d(q)`` the vector of the block holding pixel ``q`` (`warp`, bilinear `grid_sample`).

Metrics: `endpoint_error` between fields; PSNR of the rendered clip against the true frames, with the warp by the
true motion as the upper bound a motion-only renderer can reach (what it cannot show: content that enters the
frame, disoccluded background, anything not in the keyframe).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from ..registry import register_detokenizer
from ..tokens import Tokens
from ..video import sinusoid_table

__all__ = [
    "WARP_PADDINGS",
    "MotionDecoder",
    "WarpPadding",
    "endpoint_error",
    "upsample_field",
    "warp",
    "warp_clip",
]

WarpPadding = Literal["border", "zeros", "wrap"]
WARP_PADDINGS: tuple[str, ...] = get_args(WarpPadding)


def upsample_field(field: torch.Tensor, block: int) -> torch.Tensor:
    """A block field ``[..., 2, h, w]`` -> per pixel ``[..., 2, h*block, w*block]`` (each pixel takes its block's
    vector, as a codec applies one vector to a whole macroblock)."""
    if field.dim() < 3 or field.shape[-3] != 2:
        raise ValueError(f"a motion field is [..., 2, h, w] (dx, dy), got shape {tuple(field.shape)}")
    return field.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)


def warp(image: torch.Tensor, flow: torch.Tensor, padding: WarpPadding = "border") -> torch.Tensor:
    """Backward warp: ``out(q) = image(q - flow(q))`` with bilinear interpolation.

    Args:
        image: ``[B, C, H, W]``.
        flow: ``[B, 2, H, W]`` per-pixel ``(dx, dy)`` in pixels (+x right, +y down).
        padding: what lies outside the image: ``border`` (edge pixels, as codecs extend the reference), ``zeros``,
            or ``wrap`` (a torus, as the moving-digits canvas).
    """
    if image.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(
            f"warp expects image [B, C, H, W] and flow [B, 2, H, W], got {tuple(image.shape)}, {tuple(flow.shape)}"
        )
    if image.shape[0] != flow.shape[0] or image.shape[2:] != flow.shape[2:]:
        raise ValueError(f"flow {tuple(flow.shape)} does not match image {tuple(image.shape)} (same B, H, W)")
    if padding not in WARP_PADDINGS:
        raise ValueError(f"padding must be one of {WARP_PADDINGS}, got {padding!r}")
    h, w = image.shape[-2:]
    dtype = image.dtype if image.is_floating_point() else torch.float32
    ys, xs = torch.meshgrid(
        torch.arange(h, device=image.device, dtype=dtype),
        torch.arange(w, device=image.device, dtype=dtype),
        indexing="ij",
    )
    x = xs - flow[:, 0].to(dtype)
    y = ys - flow[:, 1].to(dtype)
    src = image.to(dtype)
    if padding == "wrap":
        # sample a copy padded by one pixel on the far sides, so the bilinear neighbour of column w-1 is column 0
        x, y = torch.remainder(x, w), torch.remainder(y, h)
        src = F.pad(src, (0, 1, 0, 1), mode="circular")
        size_x, size_y, mode = w, h, "border"
    else:
        size_x, size_y, mode = w - 1, h - 1, padding
    grid = torch.stack([2 * x / max(size_x, 1) - 1, 2 * y / max(size_y, 1) - 1], dim=-1)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode=mode, align_corners=True)


def warp_clip(keyframe: torch.Tensor, field: torch.Tensor, block: int, padding: WarpPadding = "border") -> torch.Tensor:
    """Render a clip from its first frame and its motion: ``keyframe [B, C, H, W]``, block ``field [B, T-1, 2, h, w]``
    -> frames ``[B, T, C, H, W]``; frame ``t+1`` is frame ``t`` warped by step ``t`` (errors accumulate, as in a codec
    without residuals)."""
    if keyframe.dim() != 4 or field.dim() != 5 or field.shape[2] != 2:
        raise ValueError(
            f"warp_clip expects keyframe [B, C, H, W] and field [B, T-1, 2, h, w], got "
            f"{tuple(keyframe.shape)}, {tuple(field.shape)}"
        )
    h, w = keyframe.shape[-2:]
    if (field.shape[-2] * block, field.shape[-1] * block) != (h, w):
        raise ValueError(
            f"a {field.shape[-2]}x{field.shape[-1]} block field with block={block} covers "
            f"{field.shape[-2] * block}x{field.shape[-1] * block} px, the keyframe is {h}x{w}"
        )
    frames = [keyframe.to(torch.float32) if not keyframe.is_floating_point() else keyframe]
    for t in range(field.shape[1]):
        frames.append(warp(frames[-1], upsample_field(field[:, t], block), padding))
    return torch.stack(frames, dim=1)


def step_mask(frame_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The frame mask ``[B, T]`` (True = a real frame) -> the step mask ``[B, T-1]`` of the motion fields: step ``t``
    leads into frame ``t + 1`` and is real when that frame is. ``None`` (no padding) stays ``None``."""
    if frame_mask is None:
        return None
    if frame_mask.dim() != 2:
        raise ValueError(f"step_mask expects a frame mask [B, T], got {tuple(frame_mask.shape)}")
    return frame_mask[:, 1:]


def endpoint_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean endpoint error ``|pred - target|_2`` over the vectors of two fields ``[B, S, 2, h, w]`` (px); ``mask
    [B, S]`` (True = a real step) restricts the mean to real steps."""
    if pred.shape != target.shape or pred.dim() != 5 or pred.shape[2] != 2:
        raise ValueError(
            f"endpoint_error expects two fields [B, S, 2, h, w] of one shape, got {tuple(pred.shape)}"
            f" and {tuple(target.shape)}"
        )
    epe = (pred.float() - target.float()).pow(2).sum(2).sqrt()  # [B, S, h, w]
    if mask is None:
        return epe.mean()
    weight = mask.to(epe.device, epe.dtype)[:, :, None, None].expand_as(epe)
    return (epe * weight).sum() / weight.sum().clamp_min(1.0)


@register_detokenizer("motion")
class MotionDecoder(nn.Module):
    """Motion tokens ``[B, T''*h'*w', D]`` (grid ``(T'', h', w')``) -> block motion field ``[B, T-1, 2, h, w]`` (px).

    Args:
        in_dim: width of the incoming tokens.
        patch_size / t_patch / block / scale / pad_first: the `MotionTokens` geometry it inverts (``scale`` defaults to
            ``search`` = 7, the tokenizer's default).
        depth / num_heads / mlp_ratio: transformer blocks before the head (0 = a linear head per token, the
            tokenizer's conv transposed); with depth > 0 VideoMAE's flat-index sinusoid positions are added first
            when ``add_pos`` (tokens from a VQ codebook carry none).
        padding: what `render` warps in from outside the frame (`warp`).
    """

    def __init__(
        self,
        in_dim: int,
        patch_size: int = 2,
        t_patch: int = 2,
        block: int = 16,
        scale: float = 7.0,
        pad_first: bool = True,
        depth: int = 0,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        add_pos: bool = True,
        padding: WarpPadding = "border",
    ):
        super().__init__()
        if padding not in WARP_PADDINGS:
            raise ValueError(f"padding must be one of {WARP_PADDINGS}, got {padding!r}")
        if depth and in_dim % num_heads:
            raise ValueError(f"in_dim={in_dim} is not divisible by num_heads={num_heads}")
        self.in_dim, self.patch_size, self.t_patch, self.block = int(in_dim), int(patch_size), int(t_patch), int(block)
        self.scale, self.pad_first, self.add_pos, self.padding = float(scale), bool(pad_first), bool(add_pos), padding
        self.blocks = nn.ModuleList([Block(in_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(in_dim) if depth else nn.Identity()
        self.head = nn.Linear(in_dim, 2 * self.t_patch * self.patch_size**2)

    def forward(self, tokens: Tokens, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """``tokens`` (the grid tokens of `MotionTokens` or VQ-decoded ones; special tokens are dropped) -> field
        ``[B, S, 2, h, w]`` in pixels, ``S = T''*t_patch`` (minus the padded first step with ``pad_first``)."""
        if not isinstance(tokens, Tokens):
            raise TypeError(f"MotionDecoder decodes Tokens, got {type(tokens).__name__}")
        grid = tuple(grid or tokens.grid or ())
        if len(grid) != 3:
            raise ValueError(f"MotionDecoder needs the token grid (T'', h', w') (tokens.grid or grid=), got {grid}")
        if tokens.dim != self.in_dim:
            raise ValueError(f"MotionDecoder expects tokens of width {self.in_dim}, got {tokens.dim}")
        x = tokens.grid_tokens()
        b, n, _ = x.shape
        if n != math.prod(grid):
            raise ValueError(f"{n} grid tokens do not fill the motion grid {grid}")
        if self.blocks:
            if self.add_pos:
                x = x + sinusoid_table(n, self.in_dim).to(device=x.device, dtype=x.dtype)
            for blk in self.blocks:
                x = blk(x)
            x = self.norm(x)
        tt, hh, ww = grid
        tp, p = self.t_patch, self.patch_size
        v = self.head(x).reshape(b, tt, hh, ww, 2, tp, p, p)  # the Conv3d patch layout: (channel, t, row, col)
        field = v.permute(0, 1, 5, 4, 2, 6, 3, 7).reshape(b, tt * tp, 2, hh * p, ww * p) * self.scale
        return field[:, 1:] if self.pad_first else field

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between fields ``[B, S, 2, h, w]`` in the tokenizer's units (``/ scale``); ``mask [B, S]`` = real
        steps."""
        if pred.shape != target.shape:
            raise ValueError(f"predicted field {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        err = ((pred.float() - target.float()) / self.scale).pow(2)
        if mask is None:
            return err.mean()
        weight = mask.to(err.device, err.dtype)[:, :, None, None, None].expand_as(err)
        return (err * weight).sum() / weight.sum().clamp_min(1.0)

    def render(self, keyframe: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """`warp_clip` of ``keyframe [B, C, H, W]`` by ``field [B, T-1, 2, h, w]`` -> ``[B, T, C, H, W]``."""
        return warp_clip(keyframe, field, self.block, self.padding)

"""`video_tubelets`: video clips -> VideoMAE tubelet `Tokens` (Conv3d tubelet embedding + fixed sinusoid positions).

Layout and weights follow `transformers.VideoMAEModel`'s embeddings exactly (``from_videomae`` copies them): input
``[B, T, C, H, W]`` (already normalised, as VideoMAE's image processor gives), a Conv3d with
``kernel = stride = (tubelet_size, patch_size, patch_size)``, tokens flattened ``t``-major then row, col, and
VideoMAE's 1-D sinusoid table over the flat token index added to every token.

`normalize_frames` turns decoded uint8 ``[B, T, H, W, 3]`` frames (`mmblocks.data.video_io.decode_video`) into that
input.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .checks import check_input
from .registry import register_tokenizer
from .tokens import Tokens

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VideoTubelets",
    "normalize_frames",
    "sinusoid_table",
    "token_grid_pos",
    "grid_pos_embed",
    "tubelet_mask",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_EMBED_KINDS = ("sincos", "learned", "none")


@functools.lru_cache(maxsize=16)
def _sinusoid_np(n: int, d: int) -> np.ndarray:
    # Same float64 operations as transformers' `get_sinusoid_encoding_table`, vectorised (bit-identical result).
    j = np.arange(d)
    table = np.arange(n)[:, None] / np.power(10000, 2 * (j // 2) / d)[None, :]
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return table


def sinusoid_table(n: int, d: int) -> torch.Tensor:
    """VideoMAE's fixed position table ``[1, n, d]`` float32: ``sin/cos(pos / 10000^(2*(j//2)/d))`` for the flat index.

    Even columns hold the sines, odd columns the cosines (computed in float64, then cast, as transformers does).
    """
    return torch.from_numpy(_sinusoid_np(int(n), int(d))).float().unsqueeze(0)


def token_grid_pos(grid: tuple[int, ...], batch: int, num_prefix: int = 0, device=None) -> torch.Tensor:
    """``[B, num_prefix + prod(grid), len(grid)]`` float grid coordinates (row-major); prefix tokens at -1."""
    axes = [torch.arange(g, device=device, dtype=torch.float32) for g in grid]
    coords = torch.stack([a.flatten() for a in torch.meshgrid(*axes, indexing="ij")], dim=-1)
    special = torch.full((num_prefix, len(grid)), -1.0, device=device)
    return torch.cat([special, coords], dim=0).unsqueeze(0).expand(batch, -1, -1)


def normalize_frames(
    frames: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 ``[B, T, H, W, C]`` (or ``[T, H, W, C]``) -> float ``[B, T, C, H, W]`` = ``(x / 255 - mean) / std``."""
    if frames.dim() == 4:
        frames = frames.unsqueeze(0)
    if frames.dim() != 5:
        raise ValueError(f"normalize_frames expects [B, T, H, W, C] or [T, H, W, C], got {tuple(frames.shape)}")
    c = frames.shape[-1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {c} channels")
    x = frames.permute(0, 1, 4, 2, 3).to(dtype) / 255.0
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(1, 1, c, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(1, 1, c, 1, 1)
    return (x - m) / s


def grid_pos_embed(
    kind: str,
    table: torch.Tensor | None,
    train_grid: tuple[int, ...],
    grid: tuple[int, ...],
    dim: int,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """Absolute positions ``[1, prod(grid), dim]`` for a token ``grid``.

    ``sincos``: VideoMAE's flat-index `sinusoid_table`; ``learned``: ``table [1, prod(train_grid), dim]``,
    resampled (linear / bilinear / trilinear, ``align_corners=False``) when ``grid != train_grid``; ``none``: None.
    """
    if kind == "none":
        return None
    n = math.prod(grid)
    if kind == "sincos":
        return sinusoid_table(n, dim).to(device=like.device, dtype=like.dtype)
    if tuple(grid) != tuple(train_grid):
        modes = {1: "linear", 2: "bilinear", 3: "trilinear"}
        t = table.reshape(1, *train_grid, dim).movedim(-1, 1)
        t = F.interpolate(t, size=tuple(grid), mode=modes[len(grid)], align_corners=False)
        table = t.movedim(1, -1).reshape(1, n, dim)
    return table.to(like.dtype)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@register_tokenizer("video_tubelets")
class VideoTubelets(nn.Module):
    """VideoMAE tubelet embedding.

    Args:
        img_size: training frame size (sets the ``learned`` position table's grid).
        num_frames: training clip length (ditto).
        patch_size: spatial patch side in pixels.
        tubelet_size: frames per tubelet.
        in_chans: channels ``C``.
        embed_dim: token width ``D``.
        pos_embed: ``sincos`` (VideoMAE's fixed 1-D sinusoid over the flat token index; built for the actual token
            count, so it is only meaningful at the trained grid, as in VideoMAE), ``learned`` (trunc-normal 0.02 table
            on the training grid, trilinearly resampled for other grids) or ``none``.
        class_token: prepend a learned cls token (VideoMAE has none; the cls token gets no position).
        bias: conv bias.
        allow_nonfinite: let NaN / infinite frames through instead of raising (`tokenizers_mm.checks.check_input`).

    ``forward(frames [B, T, C, H, W], mask=None, motion=None)`` -> `Tokens` with ``x [B, P + T'*H'*W', D]``,
    ``grid (T', H', W') = (T / tubelet, H / patch, W / patch)``, ``pos [B, N, 3]`` = (t, row, col) of each tubelet in
    tubelet units (cls at -1), ``num_prefix P`` (1 with ``class_token``), ``modality "video"``.

    ``mask`` is the frame mask ``[B, T]`` (True = real frame, padded frames at the end): a tubelet is real if its
    first frame is real, so a clip of 7 real frames padded to 8 keeps all 4 tubelets along t when ``tubelet_size=2``
    (the last one half padding) and a clip of 6 keeps 3. ``motion`` is ignored (the common video-tokenizer signature).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        num_frames: int = 16,
        patch_size: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 768,
        pos_embed: str = "sincos",
        class_token: bool = False,
        bias: bool = True,
        allow_nonfinite: bool = False,
    ):
        super().__init__()
        self.allow_nonfinite = allow_nonfinite
        if pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_KINDS}, got {pos_embed!r}")
        self.img_size = _pair(img_size)
        self.patch_size = int(patch_size)
        self.tubelet_size = int(tubelet_size)
        self.num_frames = int(num_frames)
        if self.tubelet_size < 1 or self.patch_size < 1:
            raise ValueError(f"tubelet_size and patch_size must be >= 1, got {tubelet_size} and {patch_size}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.pos_embed_kind = pos_embed
        self.num_prefix_tokens = int(class_token)
        self.proj = nn.Conv3d(
            in_chans,
            embed_dim,
            kernel_size=(self.tubelet_size, self.patch_size, self.patch_size),
            stride=(self.tubelet_size, self.patch_size, self.patch_size),
            bias=bias,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.train_grid = (
            max(self.num_frames // self.tubelet_size, 1),
            self.img_size[0] // self.patch_size,
            self.img_size[1] // self.patch_size,
        )
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.train_grid), embed_dim))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None

    # ------------------------------------------------------------------ weights
    @classmethod
    def from_videomae(cls, model: nn.Module, class_token: bool = False) -> VideoTubelets:
        """A tokenizer holding a copy of a `transformers` VideoMAE model's (or `VideoMAEEmbeddings`') tubelet conv.

        Accepts `VideoMAEModel`, `VideoMAEForVideoClassification`, `VideoMAEForPreTraining` or the embeddings
        module; the position table is VideoMAE's fixed sinusoid (``pos_embed="sincos"``).
        """
        emb = model
        for attr in ("videomae", "embeddings"):
            emb = getattr(emb, attr, emb)
        pe = getattr(emb, "patch_embeddings", None)
        if pe is None or not hasattr(pe, "projection"):
            raise TypeError(f"expected a transformers VideoMAE model or VideoMAEEmbeddings, got {type(model).__name__}")
        conv = pe.projection
        config = emb.config
        tok = cls(
            img_size=tuple(pe.image_size),
            num_frames=config.num_frames,
            patch_size=pe.patch_size[0],
            tubelet_size=pe.tubelet_size,
            in_chans=conv.in_channels,
            embed_dim=conv.out_channels,
            pos_embed="sincos",
            class_token=class_token,
            bias=conv.bias is not None,
        )
        if pe.patch_size[0] != pe.patch_size[1]:
            raise ValueError(f"only square patches are supported, VideoMAE has {tuple(pe.patch_size)}")
        with torch.no_grad():
            tok.proj.load_state_dict(conv.state_dict())
        return tok.to(conv.weight.dtype)

    # ------------------------------------------------------------------ shapes
    def grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Token grid ``(T', H', W')`` for a ``T x H x W`` clip (errors if the clip does not tile)."""
        if t < 1:
            raise ValueError(f"video_tubelets needs at least one frame, got T={t}")
        if t % self.tubelet_size:
            hint = (
                f"repeat the frame {self.tubelet_size} times (VideoMAE's way to embed a still image) "
                "or build the tokenizer with tubelet_size=1"
                if t == 1
                else f"sample T as a multiple of {self.tubelet_size} (e.g. {t + (-t) % self.tubelet_size}) "
                "and mask the padded frames"
            )
            raise ValueError(f"a clip of T={t} frames does not split into tubelets of {self.tubelet_size}: {hint}")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"frame size {h}x{w} is not a multiple of the patch size {self.patch_size}: resize or crop the frames"
            )
        return t // self.tubelet_size, h // self.patch_size, w // self.patch_size

    def num_tokens(self, t: int, h: int, w: int) -> int:
        """Tokens (prefix included) for a ``T x H x W`` clip."""
        return self.num_prefix_tokens + math.prod(self.grid(t, h, w))

    def _positions(self, grid: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor | None:
        return grid_pos_embed(self.pos_embed_kind, self.pos_embed, self.train_grid, grid, self.embed_dim, like)

    # ------------------------------------------------------------------ forward
    def forward(
        self, frames: torch.Tensor, mask: torch.Tensor | None = None, motion: torch.Tensor | None = None
    ) -> Tokens:
        """``frames [B, T, C, H, W]`` float (normalised), optional frame ``mask [B, T]`` -> `Tokens`."""
        frames = check_input(
            frames,
            "video_tubelets",
            "frames [B, T, C, H, W]",
            ndim=5,
            dtype=self.proj.weight.dtype,
            allow_nonfinite=self.allow_nonfinite,
            integer_hint="use tokenizers_mm.video.normalize_frames on uint8 frames",
        )
        b, t, c, h, w = frames.shape
        if c != self.in_chans:
            raise ValueError(
                f"video_tubelets expects {self.in_chans} channels at dim 2 of [B, T, C, H, W], got {c} "
                f"(shape {tuple(frames.shape)}; decoded frames are [B, T, H, W, C]: use normalize_frames)"
            )
        grid = self.grid(t, h, w)
        x = self.proj(frames.transpose(1, 2)).flatten(2).transpose(1, 2)  # [B, T'H'W', D]
        pos_embed = self._positions(grid, x)
        if pos_embed is not None:
            x = x + pos_embed
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        token_mask = None
        if mask is not None:
            token_mask = tubelet_mask(mask, b, t, grid, self.tubelet_size, self.num_prefix_tokens)
        return Tokens(
            x=x,
            mask=token_mask,
            pos=token_grid_pos(grid, b, self.num_prefix_tokens, x.device),
            grid=grid,
            num_prefix=self.num_prefix_tokens,
            modality="video",
        )


def tubelet_mask(
    frame_mask: torch.Tensor, b: int, t: int, grid: tuple[int, ...], t_size: int, num_prefix: int = 0, offset: int = 0
) -> torch.Tensor:
    """Token mask ``[B, num_prefix + prod(grid)]`` from a frame mask ``[B, t]``: a token along time index ``k`` is real
    if frame ``k * t_size + offset`` is real (its first frame); prefix tokens are always real."""
    if frame_mask.dim() != 2 or tuple(frame_mask.shape) != (b, t):
        raise ValueError(f"frame mask must be [B, T] = [{b}, {t}], got {tuple(frame_mask.shape)}")
    fm = frame_mask.to(torch.bool)
    first = fm[:, offset::t_size][:, : grid[0]]  # [B, T']
    per_token = first[:, :, None].expand(b, grid[0], math.prod(grid[1:])).reshape(b, -1)
    prefix = torch.ones((b, num_prefix), dtype=torch.bool, device=fm.device)
    return torch.cat([prefix, per_token], dim=1)

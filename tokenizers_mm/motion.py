"""Motion: block-matching motion fields and the `motion` / `keyframe_motion` tokenizers.

Sign convention (shared with `mmblocks.data.video_io.decode_video(..., export_mvs=True)`): a motion field is
``[..., 2, h, w]`` with channel 0 = ``dx`` (pixels, + = right) and channel 1 = ``dy`` (pixels, + = down). The vector
of block ``(r, c)`` of frame ``t+1`` is the displacement of its content from frame ``t`` to frame ``t+1``:
``frame[t+1](p) ~= frame[t](p - (dx, dy))`` for the pixels ``p`` of the block. A square moving right by 3 px and
down by 2 px gives ``(+3, +2)`` on its blocks; a static background gives ``(0, 0)``.

`block_matching` is an exhaustive integer-pel search (SAD on luminance) vectorised in torch (its oracle, a plain
per-block NumPy search written from this definition, lives in ``tests/test_motion.py``).

`MotionTokens` embeds a motion field (computed by block matching or given, e.g. codec vectors) as spatio-temporal
patches; `KeyframeMotion` is Video-LaVIT's decoupling: the first frame as image patches, then the motion tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .image import ImagePatches
from .registry import register_tokenizer
from .tokens import Tokens
from .video import POS_EMBED_KINDS, grid_pos_embed, token_grid_pos, tubelet_mask

__all__ = [
    "BT601",
    "KeyframeMotion",
    "MotionTokens",
    "block_matching",
    "candidate_displacements",
    "luminance",
]

BT601 = (0.299, 0.587, 0.114)
MOTION_SOURCES = ("block_matching", "codec")


def luminance(frames: torch.Tensor) -> torch.Tensor:
    """``[B, T, C, H, W]`` -> float32 ``[B, T, H, W]``: BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (C=3) or C=1 as is.

    Works on any scale (uint8 0..255, [0, 1] floats, normalised frames): block matching only compares values.
    """
    if frames.dim() != 5:
        raise ValueError(f"expected frames [B, T, C, H, W], got shape {tuple(frames.shape)}")
    c = frames.shape[2]
    x = frames.to(torch.float32)
    if c == 1:
        return x[:, :, 0]
    if c == 3:
        return x[:, :, 0] * BT601[0] + x[:, :, 1] * BT601[1] + x[:, :, 2] * BT601[2]
    raise ValueError(f"block matching needs 1 (luma) or 3 (RGB) channels at dim 2 of [B, T, C, H, W], got C={c}")


def candidate_displacements(search: int) -> list[tuple[int, int]]:
    """All ``(dx, dy)`` with ``|dx|, |dy| <= search``, in tie-break order: by ``dx^2 + dy^2``, then ``(dy, dx)``.

    The first candidate with the smallest SAD wins, so ties go to the smallest displacement (static -> 0).
    """
    r = range(-search, search + 1)
    return sorted(((dx, dy) for dy in r for dx in r), key=lambda d: (d[0] ** 2 + d[1] ** 2, d[1], d[0]))


def _check(frames: torch.Tensor, block: int, search: int) -> tuple[int, int, int, int, int]:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5:
        raise ValueError(
            f"block_matching expects frames [B, T, C, H, W], got shape {tuple(getattr(frames, 'shape', ()))}"
        )
    b, t, _, h, w = frames.shape
    if t < 2:
        raise ValueError(f"motion needs at least 2 frames (it is measured between consecutive frames), got T={t}")
    if block < 1 or search < 0:
        raise ValueError(f"block must be >= 1 and search >= 0, got block={block}, search={search}")
    if h % block or w % block:
        raise ValueError(
            f"frame size {h}x{w} is not a multiple of the block size {block}: crop or resize to a multiple "
            f"(e.g. {h - h % block}x{w - w % block})"
        )
    return b, t, h, w, h // block


def block_matching(frames: torch.Tensor, block: int = 16, search: int = 7) -> torch.Tensor:
    """Exhaustive block matching between consecutive frames.

    Args:
        frames: ``[B, T, C, H, W]`` (C = 3 RGB or 1 luma; any dtype/scale), H and W multiples of ``block``, T >= 2.
        block: block side in pixels (16 = the codec macroblock grid).
        search: integer displacements ``-search..search`` in x and y are tried ((2s+1)^2 candidates).

    Returns float32 ``[B, T-1, 2, H/block, W/block]`` = (dx, dy) per block of frame ``t+1`` (module docstring for the
    sign). Each candidate's SAD is the sum over the block of ``|Y[t+1](p) - Y[t](p - d)|`` with frame ``t`` edge-
    extended (replicate padding, as codecs extend the reference); the smallest SAD wins, ties going to the
    candidate first in `candidate_displacements` (the smallest displacement). Runs one vectorised pass per ``dy``.
    """
    b, t, h, w, hb = _check(frames, block, search)
    wb, s, k = w // block, search, 2 * search + 1
    y = luminance(frames)
    n = b * (t - 1)
    prev = F.pad(y[:, :-1].reshape(n, 1, h, w), (s, s, s, s), mode="replicate")[:, 0]  # [n, H+2s, W+2s]
    cur = y[:, 1:].reshape(n, h, 1, w)
    sads = []
    diff = torch.empty((n, h, k, w), dtype=torch.float32, device=y.device)  # contiguous: the reductions stay fast
    for dy in range(-s, s + 1):
        rows = prev[:, s - dy : s - dy + h]  # Y[t](p - d) rows for this dy: [n, H, W+2s]
        windows = rows.unfold(2, w, 1)  # [n, H, k, W]; window j starts at column j = s - dx
        torch.sub(windows, cur, out=diff).abs_()
        sad = diff.view(n, h, k, wb, block).sum(-1).view(n, hb, block, k, wb).sum(2)  # [n, hb, k(j), wb]
        sads.append(sad)
    sad = torch.stack(sads, dim=1)  # [n, k(dy), hb, k(j), wb]
    sad = sad.permute(0, 2, 4, 1, 3).reshape(n, hb, wb, k * k)  # candidate index = (dy + s) * k + (s - dx)
    order = candidate_displacements(s)
    perm = torch.tensor([(dy + s) * k + (s - dx) for dx, dy in order], device=sad.device)
    best = sad.index_select(-1, perm).argmin(dim=-1)  # first minimum = smallest displacement among ties
    vec = torch.tensor(order, dtype=torch.float32, device=sad.device)[best]  # [n, hb, wb, 2]
    return vec.permute(0, 3, 1, 2).reshape(b, t - 1, 2, hb, wb).contiguous()


# ---------------------------------------------------------------------------------------------------- tokenizers
def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@register_tokenizer("motion")
class MotionTokens(nn.Module):
    """Motion-field tokenizer: spatio-temporal patches of a ``(dx, dy)`` field on the macroblock grid -> `Tokens`.

    Args:
        embed_dim: token width ``D``.
        patch_size: macroblocks per token side (``p``; a token covers ``16p x 16p`` pixels with ``block=16``).
        t_patch: motion steps per token.
        source: ``block_matching`` (compute the field from ``frames`` unless ``motion=`` is given) or ``codec``
            (``motion=`` is required, e.g. ``decode_video(..., export_mvs=True).motion``).
        block / search: block-matching settings (the field's grid is ``H/block x W/block``).
        scale: the field is divided by ``scale`` before the conv (default ``search``, so block-matched values lie in
            ``[-1, 1]``).
        pad_first: prepend a zero step so the field has one step per frame (step ``t`` = motion into frame ``t``;
            frame 0 has none). A ``T``-frame clip then gives ``T / t_patch`` tokens along time, aligned with VideoMAE
            tubelets of the same size. Without it the ``T-1`` steps must divide by ``t_patch``.
        img_size / num_frames: training clip geometry (sets the ``learned`` position table's grid).
        pos_embed: ``sincos`` (VideoMAE's flat-index sinusoid), ``learned`` or ``none`` (see `VideoTubelets`).
        bias: conv bias.

    ``forward(frames=None, mask=None, motion=None)``: ``frames [B, T, C, H, W]``, frame ``mask [B, T]`` (True = real,
    padding at the end), ``motion [B, T-1, 2, h, w]``. Returns `Tokens` ``x [B, T''*h'*w', D]`` with
    ``grid (T'', h', w') = (S / t_patch, h / p, w / p)`` (``S`` = steps after padding), ``pos (t, row, col)`` in token
    units, ``modality "motion"``. A token is real if the frame its first step leads into is real.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        patch_size: int = 2,
        t_patch: int = 2,
        source: str = "block_matching",
        block: int = 16,
        search: int = 7,
        scale: float | None = None,
        pad_first: bool = True,
        img_size: int | tuple[int, int] = 224,
        num_frames: int = 16,
        pos_embed: str = "sincos",
        bias: bool = True,
    ):
        super().__init__()
        if source not in MOTION_SOURCES:
            raise ValueError(f"source must be one of {MOTION_SOURCES}, got {source!r}")
        if pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_KINDS}, got {pos_embed!r}")
        if patch_size < 1 or t_patch < 1:
            raise ValueError(f"patch_size and t_patch must be >= 1, got {patch_size} and {t_patch}")
        self.embed_dim = embed_dim
        self.patch_size = int(patch_size)
        self.t_patch = int(t_patch)
        self.source = source
        self.block = int(block)
        self.search = int(search)
        self.scale = float(scale) if scale is not None else float(max(search, 1))
        self.pad_first = bool(pad_first)
        self.pos_embed_kind = pos_embed
        self.proj = nn.Conv3d(
            2,
            embed_dim,
            kernel_size=(self.t_patch, self.patch_size, self.patch_size),
            stride=(self.t_patch, self.patch_size, self.patch_size),
            bias=bias,
        )
        hw = _pair(img_size)
        steps = num_frames if self.pad_first else num_frames - 1
        self.train_grid = (
            max(steps // self.t_patch, 1),
            max(hw[0] // self.block // self.patch_size, 1),
            max(hw[1] // self.block // self.patch_size, 1),
        )
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.train_grid), embed_dim))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None

    def grid(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Token grid for a ``T``-frame clip whose motion field is ``h x w`` macroblocks."""
        if t < 2:
            raise ValueError(f"motion tokens need a clip of at least 2 frames, got T={t}")
        steps = t if self.pad_first else t - 1
        if steps % self.t_patch:
            hint = "pad_first=True aligns steps with frames" if not self.pad_first else "sample T accordingly"
            raise ValueError(
                f"{steps} motion steps (T={t}, pad_first={self.pad_first}) do not split into t_patch={self.t_patch}: "
                f"{hint}"
            )
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"motion field of {h}x{w} blocks is not a multiple of patch_size={self.patch_size} blocks: use frames "
                f"whose size is a multiple of {self.block * self.patch_size} px"
            )
        return steps // self.t_patch, h // self.patch_size, w // self.patch_size

    def num_tokens(self, t: int, h: int, w: int) -> int:
        """Tokens for a ``T x H x W`` (pixels) clip."""
        return math.prod(self.grid(t, -(-h // self.block), -(-w // self.block)))

    def field(self, frames: torch.Tensor | None, motion: torch.Tensor | None) -> torch.Tensor:
        """The motion field ``[B, T-1, 2, h, w]`` to embed: ``motion`` if given, else block matching of ``frames``."""
        if motion is not None:
            if motion.dim() != 5 or motion.shape[2] != 2:
                raise ValueError(f"motion must be [B, T-1, 2, h, w] (dx, dy), got shape {tuple(motion.shape)}")
            if frames is not None and motion.shape[1] != frames.shape[1] - 1:
                raise ValueError(
                    f"motion has {motion.shape[1]} steps but frames have T={frames.shape[1]} (expected T-1 steps)"
                )
            return motion
        if self.source == "codec":
            raise ValueError(
                "MotionTokens(source='codec') needs motion= (e.g. decode_video(..., export_mvs=True).motion, "
                "batched with collate_clips); use source='block_matching' to compute it from frames"
            )
        if frames is None:
            raise ValueError("MotionTokens needs frames [B, T, C, H, W] or motion= [B, T-1, 2, h, w]")
        return block_matching(frames, self.block, self.search)

    def forward(
        self, frames: torch.Tensor | None = None, mask: torch.Tensor | None = None, motion: torch.Tensor | None = None
    ) -> Tokens:
        field = self.field(frames, motion)
        b, steps, _, h, w = field.shape
        t = steps + 1
        grid = self.grid(t, h, w)
        dtype = self.proj.weight.dtype
        x = field.to(dtype) / self.scale
        if self.pad_first:
            x = torch.cat([x.new_zeros(b, 1, 2, h, w), x], dim=1)
        x = self.proj(x.transpose(1, 2)).flatten(2).transpose(1, 2)  # [B, T''h'w', D]
        pos_embed = grid_pos_embed(self.pos_embed_kind, self.pos_embed, self.train_grid, grid, self.embed_dim, x)
        if pos_embed is not None:
            x = x + pos_embed
        token_mask = None
        if mask is not None:
            token_mask = tubelet_mask(mask, b, t, grid, self.t_patch, offset=0 if self.pad_first else 1)
        return Tokens(x=x, mask=token_mask, pos=token_grid_pos(grid, b, 0, x.device), grid=grid, modality="motion")


@register_tokenizer("keyframe_motion")
class KeyframeMotion(nn.Module):
    """Keyframe + motion tokens (Video-LaVIT's decoupling): the clip's first frame as image patches, then motion.

    Args:
        img_size / num_frames: training clip geometry.
        patch_size: keyframe patch side in pixels (`ImagePatches`, no cls of its own).
        in_chans: frame channels.
        embed_dim: token width ``D`` (shared by both parts).
        keyframe_pos_embed: `ImagePatches` position kind for the keyframe (``learned``, ``sincos`` 2-D, ``none``).
        motion_patch / t_patch / source / block / search / scale / pad_first / motion_pos_embed: `MotionTokens`.
        class_token: prepend a learned cls token.
        type_embed: add a learned (zero-initialised) type vector to keyframe tokens and another to motion tokens.

    ``forward(frames [B, T, C, H, W], mask=None, motion=None)`` -> `Tokens` laid out as
    ``[cls?, keyframe_1..keyframe_K, motion_1..motion_M]`` with ``K = (H/patch)(W/patch)`` and ``M`` as
    `MotionTokens`. Two grids of different shapes do not form one regular grid, so ``grid=None`` and
    ``num_prefix`` counts only the cls token (``num_keyframe_tokens`` says where the motion part starts).
    ``pos [B, N, 3] = (t, row, col)`` in one frame of reference: ``t`` in frames, ``row, col`` in keyframe-patch
    units (token centres). Keyframe tokens sit at ``t = 0``; a motion token sits at the mean index of the frames its
    steps lead into, its centre mapped to keyframe-patch units; cls sits at -1. The keyframe is always real; motion
    tokens follow the frame ``mask`` as in `MotionTokens`. ``modality "video"``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        num_frames: int = 16,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        keyframe_pos_embed: str = "learned",
        motion_patch: int = 2,
        t_patch: int = 2,
        source: str = "block_matching",
        block: int = 16,
        search: int = 7,
        scale: float | None = None,
        pad_first: bool = True,
        motion_pos_embed: str = "sincos",
        class_token: bool = False,
        type_embed: bool = True,
    ):
        super().__init__()
        self.keyframe = ImagePatches(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            class_token=False,
            pos_embed=keyframe_pos_embed,
        )
        self.motion = MotionTokens(
            embed_dim=embed_dim,
            patch_size=motion_patch,
            t_patch=t_patch,
            source=source,
            block=block,
            search=search,
            scale=scale,
            pad_first=pad_first,
            img_size=img_size,
            num_frames=num_frames,
            pos_embed=motion_pos_embed,
        )
        self.patch_size = int(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_prefix_tokens = int(class_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.type_embed = nn.Parameter(torch.zeros(2, embed_dim)) if type_embed else None

    def num_keyframe_tokens(self, h: int, w: int) -> int:
        return (h // self.patch_size) * (w // self.patch_size)

    def num_tokens(self, t: int, h: int, w: int) -> int:
        """Tokens (cls included) for a ``T x H x W`` clip."""
        return self.num_prefix_tokens + self.num_keyframe_tokens(h, w) + self.motion.num_tokens(t, h, w)

    def _motion_pos(self, grid: tuple[int, int, int], b: int, device) -> torch.Tensor:
        m = self.motion
        pos = token_grid_pos(grid, 1, 0, device)[0].clone()
        first = 0 if m.pad_first else 1
        pos[:, 0] = pos[:, 0] * m.t_patch + first + (m.t_patch - 1) / 2
        unit = m.patch_size * m.block / self.patch_size  # one motion token in keyframe-patch units
        pos[:, 1:] = (pos[:, 1:] + 0.5) * unit - 0.5
        return pos.unsqueeze(0).expand(b, -1, -1)

    def forward(
        self, frames: torch.Tensor, mask: torch.Tensor | None = None, motion: torch.Tensor | None = None
    ) -> Tokens:
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5:
            raise ValueError(
                f"keyframe_motion expects frames [B, T, C, H, W], got shape {tuple(getattr(frames, 'shape', ()))}"
            )
        b, t, c = frames.shape[:3]
        if c != self.in_chans:
            raise ValueError(f"keyframe_motion expects {self.in_chans} channels at dim 2 of [B, T, C, H, W], got {c}")
        if t < 2:
            raise ValueError(f"keyframe_motion needs at least 2 frames (a keyframe and motion), got T={t}")
        key = self.keyframe(frames[:, 0].to(self.keyframe.patch_embed.proj.weight.dtype))
        mot = self.motion(frames, mask=mask, motion=motion)
        xk, xm = key.x, mot.x
        if self.type_embed is not None:
            xk, xm = xk + self.type_embed[0], xm + self.type_embed[1]
        parts, pos = (
            [xk, xm],
            [
                F.pad(key.pos, (1, 0)),  # (0, row, col)
                self._motion_pos(mot.grid, b, xk.device),
            ],
        )
        if self.cls_token is not None:
            parts.insert(0, self.cls_token.expand(b, -1, -1).to(xk.dtype))
            pos.insert(0, torch.full((b, 1, 3), -1.0, device=xk.device))
        token_mask = None
        if mot.mask is not None:
            ones = torch.ones((b, self.num_prefix_tokens + xk.shape[1]), dtype=torch.bool, device=xk.device)
            token_mask = torch.cat([ones, mot.mask], dim=1)
        return Tokens(
            x=torch.cat(parts, dim=1),
            mask=token_mask,
            pos=torch.cat(pos, dim=1),
            grid=None,
            num_prefix=self.num_prefix_tokens,
            modality="video",
        )

"""`CausalViT`: iLLaMA's LLaMA-style ViT (arXiv 2404.06773, `techmonsterwang/iLLaMA` `models/illama.py`).

Architecture (reimplemented from the description in docs/papers.md §b, not copied):

* patch embedding (16x16 conv), learned absolute positions, and the class token appended *after* the patches
  (post-sequence cls, ``cls_position="last"``: iLLaMA's fix for attention collapse under a causal mask; the
  image feature is the last token after the final norm);
* pre-norm blocks: RMSNorm (eps 1e-6), attention with a fused ``qkv`` (bias) and ``proj`` (bias), 1-D RoPE on
  ``q, k`` over the token order (``rope="1d"``, theta 10000, on top of the absolute positions), bias-free SwiGLU
  MLP with hidden ``256 * ceil(2/3 * 4D / 256)``, DropPath, no LayerScale; final RMSNorm;
* attention ``causal`` (``causal_impl``: ``pre_softmax`` = standard additive mask, strictly causal, or
  ``post_softmax_mult`` = iLLaMA's released code, softmax then x tril without renormalisation, not strictly
  causal), ``bidirectional``, or ``soft`` (mix ratio ``r`` from a `SoftMaskSchedule`, set every step by
  `advance_soft_masks`; ``r = 1`` bidirectional, ``r = 0`` the chosen causal implementation).

Options beyond iLLaMA: ``cls_position="first"`` (the collapsing arm of the ablation), ``rope="2d"``
(VisionLLaMA's axial 2-D RoPE over (row, col), cls unrotated, AS2DRoPE auto-scaling with ``rope_train_grid``)
and ``rope="none"``.

Sizes (`CAUSAL_VIT_PRESETS`): tiny 192/12 layers/3 heads, small 384/12/6, base 768/12/12, large 1024/24/16.

`MMEncoder` runs it like `TimmViT`: ``make_tokenizer()`` (``image_patches`` with ``cls_position``), ``norm_pre``
(identity), ``blocks[i](x, attn_mask)`` and ``norm``. The blocks compute their rotary from the token count; for
``rope="2d"`` the grid comes from the backbone's own tokenizer (a forward hook records it) or from `prepare(tokens)`;
with neither, a square grid is assumed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from timm.layers import DropPath, RmsNorm, SwiGLU, trunc_normal_
from torch import nn

from tokenizers_mm import ImagePatches, Tokens
from tokenizers_mm.image import CLS_POSITIONS, ClsPosition, PosEmbed

from ..layers.attention import masked_attention
from ..layers.masks import ATTENTION_MODES, CAUSAL_IMPLS, AttentionMode, CausalImpl
from ..layers.rope import apply_rotary, axial_rope, grid_positions, sequence_rope
from ..layers.soft_mask import SoftMaskSchedule
from .base import BackboneBase
from .registry import register_backbone

__all__ = [
    "CAUSAL_VIT_PRESETS",
    "CausalViT",
    "CausalViTAttention",
    "CausalViTBlock",
    "causal_vit",
    "swiglu_hidden_dim",
]

CausalViTSize = Literal["tiny", "small", "base", "large"]
VitRope = Literal["1d", "2d", "none"]
VIT_ROPES: tuple[str, ...] = get_args(VitRope)
CAUSAL_VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


def swiglu_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """iLLaMA / LLaMA SwiGLU width: ``2/3 * 4 * dim`` rounded up to a multiple of `multiple_of`."""
    return multiple_of * math.ceil(int(2 * 4 * dim / 3) / multiple_of)


class _SequenceRoPE(nn.Module):
    """The rotary every attention layer of a `CausalViT` shares: ``(n, device, dtype) -> (cos, sin) [1, n, d]``.

    ``1d``: positions ``0..n-1`` over the whole sequence, cls included (iLLaMA). ``2d``: (row, col) of the grid
    from the last `prepare` (or a square grid inferred from ``n``), special tokens unrotated, auto-scaled to
    `train_grid` when set.
    """

    def __init__(
        self,
        mode: str,
        head_dim: int,
        theta: float,
        num_prefix: int,
        num_suffix: int,
        train_grid: tuple[int, int] | None,
    ):
        super().__init__()
        self.mode, self.head_dim, self.theta = mode, head_dim, float(theta)
        self.num_prefix, self.num_suffix = num_prefix, num_suffix
        self.train_grid = train_grid
        self._grid: tuple[int, ...] | None = None
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens_hook(self, module: nn.Module, args: Any, tokens: Tokens) -> None:
        """Forward hook on the backbone's own tokenizer: every image it embeds sets the grid."""
        if isinstance(tokens, Tokens):
            self.prepare(tokens)

    def prepare(self, tokens: Tokens) -> None:
        self._grid = tokens.grid
        if tokens.grid is not None and (tokens.num_prefix, tokens.num_suffix) != (self.num_prefix, self.num_suffix):
            raise ValueError(
                f"2-D rope expects {self.num_prefix} prefix and {self.num_suffix} suffix tokens, got "
                f"{tokens.num_prefix} and {tokens.num_suffix}"
            )

    def _grid_for(self, n: int) -> tuple[int, int]:
        special = self.num_prefix + self.num_suffix
        if self._grid is not None and len(self._grid) == 2 and math.prod(self._grid) + special == n:
            return self._grid  # type: ignore[return-value]
        side = math.isqrt(n - special)
        if side * side != n - special:
            raise ValueError(
                f"2-D rope: cannot tell the grid of {n} tokens ({n - special} patches is not a square); call "
                "backbone.prepare(tokens) before running the blocks on a non-square grid"
            )
        return (side, side)

    def forward(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self._grid_for(n) if self.mode == "2d" else None
        key = (n, grid, device, dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if self.mode == "1d":
            out = sequence_rope(n, self.head_dim, theta=self.theta, device=device, dtype=dtype)
        else:
            pos = grid_positions(grid, self.num_prefix, self.num_suffix, device=device)
            out = axial_rope(
                pos,
                self.head_dim,
                theta=self.theta,
                num_prefix=self.num_prefix,
                num_suffix=self.num_suffix,
                grid=grid,
                train_grid=self.train_grid,
                dtype=dtype,
            )
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = out
        return out

    def extra_repr(self) -> str:
        return f"mode={self.mode}, head_dim={self.head_dim}, theta={self.theta:g}, train_grid={self.train_grid}"


class CausalViTAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv``, rotary ``q, k`` and a causal / bidirectional / soft mask.

    ``x [B, N, D]``, ``attn_mask`` an additive padding mask ``[B, 1, 1, N]`` or None -> ``[B, N, D]``. In
    ``soft`` mode the mix ratio is the persistent buffer ``soft_mask_ratio`` (set by `CausalViT.set_soft_mask_ratio`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attention: str = "causal",
        causal_impl: str = "pre_softmax",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rope: nn.Module | None = None,
        soft_mask_ratio: float = 1.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if causal_impl not in CAUSAL_IMPLS:
            raise ValueError(f"causal_impl must be one of {CAUSAL_IMPLS}, got {causal_impl!r}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attention, self.causal_impl = attention, causal_impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = rope
        if attention == "soft":
            self.register_buffer("soft_mask_ratio", torch.tensor(float(soft_mask_ratio)), persistent=True)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rope is not None:
            cos, sin = self.rope(n, x.device, torch.float32)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = masked_attention(
            q,
            k,
            v,
            mode=self.attention,
            causal_impl=self.causal_impl,
            ratio=self._buffers.get("soft_mask_ratio"),
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))

    def extra_repr(self) -> str:
        mode = self.attention if self.attention == "bidirectional" else f"{self.attention} ({self.causal_impl})"
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, attention={mode}"


class CausalViTBlock(nn.Module):
    """Pre-norm block: ``x + DropPath(attn(RMSNorm(x)))``, then ``x + DropPath(SwiGLU(RMSNorm(x)))``.

    Called as ``block(x [B, N, D], attn_mask=None) -> [B, N, D]`` (timm's block signature)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_dim: int,
        *,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
        **attn_kwargs: Any,
    ):
        super().__init__()
        self.norm1 = RmsNorm(dim, eps=norm_eps)
        self.attn = CausalViTAttention(dim, num_heads, proj_drop=proj_drop, **attn_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = RmsNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden_dim, bias=False, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


@register_backbone("causal_vit", tokenizer="image_patches", flag="image_tokenizer", any_tokenizer=False)
class CausalViT(BackboneBase):
    """iLLaMA's causal ViT as a backbone (``blocks``, ``norm_pre``, ``norm``, ``embed_dim``, ``make_tokenizer``).

    Args:
        size: a `CAUSAL_VIT_PRESETS` name (``tiny``, ``small``, ``base``, ``large``); `embed_dim`, `depth`,
            `num_heads` override it.
        img_size / patch_size / in_chans: the patch embedding (training size; other sizes resample positions).
        mlp_hidden_dim: SwiGLU width (default `swiglu_hidden_dim`).
        attention: ``causal``, ``bidirectional`` or ``soft``.
        causal_impl: ``pre_softmax`` or ``post_softmax_mult`` (for ``causal`` and ``soft``).
        soft_mask: the `SoftMaskSchedule` (or its config mapping / a fixed number) of ``attention="soft"``.
        cls_position: ``last`` (iLLaMA's post-sequence cls; read out the last token) or ``first``.
        rope: ``1d`` (iLLaMA: over the token order), ``2d`` (VisionLLaMA: over (row, col)) or ``none``.
        rope_theta: rotary base.
        rope_train_grid: AS2DRoPE training grid for ``rope="2d"`` (``"auto"``: the `img_size` grid; None: off).
        pos_embed: absolute positions of the tokenizer: ``learned`` (iLLaMA), ``sincos`` or ``none``.
        qkv_bias: bias of the fused ``qkv`` (iLLaMA: True).
        drop_rate / attn_drop_rate / drop_path_rate: dropout after projections, on attention weights, stochastic
            depth (linearly increasing over the blocks).
        norm_eps: RMSNorm epsilon.
        image_tokenizer: build the patch embedding for `make_tokenizer` (False: blocks only).
    """

    def __init__(
        self,
        size: CausalViTSize = "tiny",
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_hidden_dim: int | None = None,
        attention: AttentionMode = "causal",
        causal_impl: CausalImpl = "pre_softmax",
        soft_mask: SoftMaskSchedule | dict | float | None = None,
        cls_position: ClsPosition = "last",
        rope: VitRope = "1d",
        rope_theta: float = 10000.0,
        rope_train_grid: Sequence[int] | str | None = None,
        pos_embed: PosEmbed = "learned",
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        image_tokenizer: bool = True,
    ):
        super().__init__()
        if size not in CAUSAL_VIT_PRESETS:
            raise ValueError(f"causal_vit size must be one of {sorted(CAUSAL_VIT_PRESETS)}, got {size!r}")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if causal_impl not in CAUSAL_IMPLS:
            raise ValueError(f"causal_impl must be one of {CAUSAL_IMPLS}, got {causal_impl!r}")
        if cls_position not in CLS_POSITIONS:
            raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
        if rope not in VIT_ROPES:
            raise ValueError(f"rope must be one of {VIT_ROPES}, got {rope!r}")
        schedule = SoftMaskSchedule.create(soft_mask)
        if attention == "soft" and schedule is None:
            raise ValueError(
                "attention='soft' needs a soft_mask schedule, e.g. soft_mask={'mode': 'linear', 'cutoff': 50, "
                "'unit': 'epochs'} (iLLaMA) or a fixed ratio such as soft_mask=0.5"
            )
        if attention != "soft" and schedule is not None:
            raise ValueError(f"soft_mask is only used with attention='soft', got attention={attention!r}")
        preset = CAUSAL_VIT_PRESETS[size]
        embed_dim = embed_dim or preset["embed_dim"]
        depth = depth or preset["depth"]
        num_heads = num_heads or preset["num_heads"]
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        head_dim = embed_dim // num_heads
        self.size, self.embed_dim, self.num_heads = size, embed_dim, num_heads
        self.attention, self.causal_impl, self.cls_position = attention, causal_impl, cls_position
        self.soft_mask = schedule
        self.readout = "last" if cls_position == "last" else "cls"  # the ClassifierHead pool to read the cls with

        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        train_grid = None
        if rope_train_grid == "auto":
            train_grid = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        elif rope_train_grid is not None:
            train_grid = tuple(int(g) for g in rope_train_grid)
            if len(train_grid) != 2:
                raise ValueError(f"rope_train_grid must be (h, w) or 'auto', got {rope_train_grid!r}")
        if train_grid is not None and rope != "2d":
            raise ValueError(f"rope_train_grid (AS2DRoPE) needs rope='2d', got rope={rope!r}")
        self.rope = rope
        num_prefix, num_suffix = (0, 1) if cls_position == "last" else (1, 0)
        self.rope_embed = (
            _SequenceRoPE(rope, head_dim, rope_theta, num_prefix, num_suffix, train_grid) if rope != "none" else None
        )

        self._tokenizer: ImagePatches | None = None
        if image_tokenizer:
            self._tokenizer = ImagePatches(
                img_size=img_size,
                patch_size=patch_size,
                in_chans=in_chans,
                embed_dim=embed_dim,
                class_token=True,
                pos_embed=pos_embed,
                cls_position=cls_position,
            )
        if self._tokenizer is not None and self.rope_embed is not None:
            self._tokenizer.register_forward_hook(self.rope_embed.tokens_hook)
        dpr = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            CausalViTBlock(
                embed_dim,
                num_heads,
                mlp_hidden_dim or swiglu_hidden_dim(embed_dim),
                drop_path=dpr[i],
                proj_drop=drop_rate,
                norm_eps=norm_eps,
                attention=attention,
                causal_impl=causal_impl,
                qkv_bias=qkv_bias,
                attn_drop=attn_drop_rate,
                rope=self.rope_embed,
                soft_mask_ratio=schedule.r_start if schedule is not None else 1.0,
            )
            for i in range(depth)
        )
        self.norm = RmsNorm(embed_dim, eps=norm_eps)
        self.apply(_init_weights)

    # ------------------------------------------------------------------ MMEncoder interface
    def make_tokenizer(self, **kwargs: Any) -> ImagePatches:
        """The patch embedding (``image_patches`` with this model's ``cls_position``; sized by the backbone)."""
        if kwargs:
            raise ValueError(
                f"the causal ViT embeds its own patches: set their size on the backbone, not as tokenizer arguments "
                f"{sorted(kwargs)}"
            )
        if self._tokenizer is None:
            raise ValueError("this CausalViT was built with image_tokenizer=False: it has no patch embedding")
        return self._tokenizer

    def prepare(self, tokens: Tokens) -> None:
        """Record the grid of `tokens` for the blocks' 2-D rotary (call before running the blocks one by one)."""
        if self.rope_embed is not None:
            self.rope_embed.prepare(tokens)

    # ------------------------------------------------------------------ soft mask
    def set_soft_mask_ratio(self, ratio: float) -> None:
        """Set the mix ratio ``r`` of every block (``attention="soft"``; `advance_soft_masks` calls it)."""
        ratio = float(ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"the soft mask ratio must lie in [0, 1], got {ratio}")
        if self.attention != "soft":
            raise ValueError(f"set_soft_mask_ratio needs attention='soft', this model has {self.attention!r}")
        for blk in self.blocks:
            blk.attn.soft_mask_ratio.fill_(ratio)

    @property
    def soft_mask_ratio(self) -> float | None:
        return float(self.blocks[0].attn.soft_mask_ratio) if self.attention == "soft" else None

    # ------------------------------------------------------------------ forward
    def forward_features(self, images: torch.Tensor) -> Tokens:
        """Images ``[B, C, H, W]`` -> tokenizer -> blocks -> final norm (`Tokens`)."""
        tokens = self(self.make_tokenizer()(images))
        return tokens.with_x(self.norm(tokens.x))

    def pooled(self, tokens: Tokens) -> torch.Tensor:
        """The image feature ``[B, D]``: the cls token (the last token for ``cls_position="last"``)."""
        return tokens.x[:, -1] if self.cls_position == "last" else tokens.x[:, 0]

    def extra_repr(self) -> str:
        mode = self.attention if self.attention == "bidirectional" else f"{self.attention} ({self.causal_impl})"
        soft = f", soft_mask={self.soft_mask}" if self.soft_mask is not None else ""
        return (
            f"size={self.size}, depth={self.depth}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"attention={mode}{soft}, cls_position={self.cls_position}, rope={self.rope}"
        )


def _init_weights(m: nn.Module) -> None:
    """iLLaMA's init: truncated normal (std 0.02) linears with zero biases; norms at one."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def causal_vit(size: CausalViTSize = "tiny", **kwargs: Any) -> CausalViT:
    """`CausalViT` of `size` (``tiny``/``small``/``base``/``large``)."""
    return CausalViT(size, **kwargs)


for _size in CAUSAL_VIT_PRESETS:  # causal_vit_tiny, ...: the iLLaMA sizes by name
    register_backbone(
        f"causal_vit_{_size}",
        functools.partial(CausalViT, _size),
        tokenizer="image_patches",
        flag="image_tokenizer",
        any_tokenizer=False,
    )

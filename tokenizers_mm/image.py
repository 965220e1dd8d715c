"""`image_patches`: images -> patch `Tokens` (ViT patch embedding, cls/register tokens, absolute positions)."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn

from .checks import check_input
from .registry import register_tokenizer
from .tokens import Tokens

__all__ = [
    "CLS_POSITIONS",
    "POS_EMBED_KINDS",
    "ClsPosition",
    "ImagePatches",
    "PosEmbed",
    "check_images",
    "patchify",
    "unpatchify",
]

PosEmbed = Literal["learned", "sincos", "none"]
POS_EMBED_KINDS: tuple[str, ...] = get_args(PosEmbed)
ClsPosition = Literal["first", "last"]
CLS_POSITIONS: tuple[str, ...] = get_args(ClsPosition)


#: How to turn uint8 pixels into what a patch tokenizer takes.
UINT8_HINT = (
    "convert and scale it first, e.g. images.float().div(255), then normalise with the model's mean and std "
    "(the mmblocks loader does both)"
)


def check_images(
    images: torch.Tensor,
    in_chans: int,
    patch_size: tuple[int, int],
    name: str,
    *,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """`images` checked (`check_input`: layout, empty batch, dtype, NaN/inf) and cast to `dtype`, with clear errors for
    the wrong channels or a size that is not a multiple of the patch."""
    images = check_input(
        images,
        name,
        "images [B, C, H, W]",
        ndim=4,
        dtype=dtype,
        allow_nonfinite=allow_nonfinite,
        integer_hint=UINT8_HINT,
    )
    if images.shape[1] != in_chans:
        raise ValueError(f"{name} expects {in_chans} channels, got {images.shape[1]}")
    if images.shape[2] % patch_size[0] or images.shape[3] % patch_size[1]:
        raise ValueError(
            f"image size {tuple(images.shape[2:])} is not a multiple of the patch size {tuple(patch_size)}"
        )
    return images


@register_tokenizer("image_patches")
class ImagePatches(nn.Module):
    """Conv patch embedding (timm's `PatchEmbed`) + cls / register tokens + absolute positions.

    Follows timm's `VisionTransformer` token layout exactly, so weights load from any timm ViT
    (`from_timm`): ``[cls, reg_1..reg_R, patch_1..patch_HW]`` with positions added to the patches (and, unless
    ``no_embed_class``, to the prefix tokens as well). Other image sizes interpolate the position table
    (bicubic, as timm's ``dynamic_img_size``).

    ``cls_position="last"`` puts the class token *after* the patches (iLLaMA's post-sequence cls for causal
    attention): ``[patch_1..patch_HW, cls]``, ``num_prefix=0``, ``num_suffix=1``. The position table keeps timm's
    layout (cls entry first), so `from_timm` and resizing work unchanged; its cls entry is added to the cls token
    wherever that sits.

    Args:
        img_size: training image size (sets the position table's grid).
        patch_size: patch side in pixels.
        in_chans: image channels.
        embed_dim: token width ``D``.
        class_token: prepend a learned cls token.
        num_registers: learned register tokens after the cls token (no positions of their own with
            ``no_embed_class``).
        pos_embed: ``learned`` (trunc-normal 0.02), ``sincos`` (fixed 2D sin-cos) or ``none``.
        no_embed_class: positions only for patch tokens (DeiT-3 style) instead of the prefix too.
        bias: conv bias.
        cls_position: ``first`` (timm, ViT) or ``last`` (iLLaMA; one class token, no registers).
        allow_nonfinite: let NaN / infinite pixels through instead of raising (`tokenizers_mm.checks.check_input`).

    Input ``[B, C, H, W]``, any floating dtype (cast to the weights'), B >= 1 -> `Tokens` with ``x [B, P + h*w, D]``,
    ``grid (h, w)``, ``num_prefix P`` (or ``num_suffix 1`` with the cls last), ``pos [B, N, 2]`` = (row, col) patch
    centres in patch units; special tokens sit at (-1, -1).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        class_token: bool = True,
        num_registers: int = 0,
        pos_embed: PosEmbed = "learned",
        no_embed_class: bool = False,
        bias: bool = True,
        cls_position: ClsPosition = "first",
        allow_nonfinite: bool = False,
    ):
        super().__init__()
        self.allow_nonfinite = allow_nonfinite
        if pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_KINDS}, got {pos_embed!r}")
        if num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {num_registers}")
        if cls_position not in CLS_POSITIONS:
            raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
        if cls_position == "last" and (not class_token or num_registers):
            raise ValueError(
                "cls_position='last' puts one class token after the patches: it needs class_token=True "
                f"and no registers, got class_token={class_token}, num_registers={num_registers}"
            )
        self.cls_position = cls_position
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=bias,
            output_fmt="NHWC",
            strict_img_size=False,
        )
        self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.num_prefix_tokens = int(class_token) + num_registers
        self.no_embed_class = no_embed_class
        self.pos_embed_kind = pos_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        grid = self.patch_embed.grid_size
        embed_len = grid[0] * grid[1] + (0 if no_embed_class else self.num_prefix_tokens)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
            trunc_normal_(self.pos_embed, std=0.02)
        elif pos_embed == "sincos":
            table = build_sincos2d_pos_embed(list(grid), dim=embed_dim).reshape(1, grid[0] * grid[1], embed_dim)
            if not no_embed_class:
                table = torch.cat([torch.zeros(1, self.num_prefix_tokens, embed_dim), table], dim=1)
            self.register_buffer("pos_embed", table, persistent=False)
        else:
            self.pos_embed = None
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)

    def set_cls_position(self, cls_position: ClsPosition) -> None:
        """Move the class token first or last (same weights; ``last`` needs one class token and no registers)."""
        if cls_position not in CLS_POSITIONS:
            raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
        if cls_position == "last" and (self.cls_token is None or self.reg_token is not None):
            raise ValueError(
                "cls_position='last' puts one class token after the patches: this tokenizer has "
                f"{'no class token' if self.cls_token is None else 'register tokens'}"
            )
        self.cls_position = cls_position

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @classmethod
    def from_timm(cls, vit: nn.Module, cls_position: ClsPosition = "first") -> ImagePatches:
        """An `ImagePatches` holding a copy of a timm `VisionTransformer`'s patch embedding, tokens and positions
        (``cls_position="last"``: the same weights with the class token moved after the patches)."""
        pe = vit.patch_embed
        pos = getattr(vit, "pos_embed", None)
        tok = cls(
            img_size=tuple(pe.img_size),
            patch_size=pe.patch_size[0],
            in_chans=pe.proj.in_channels,
            embed_dim=pe.proj.out_channels,
            class_token=getattr(vit, "cls_token", None) is not None,
            num_registers=getattr(vit, "num_reg_tokens", 0),
            pos_embed="learned" if pos is not None else "none",
            no_embed_class=getattr(vit, "no_embed_class", False),
            bias=pe.proj.bias is not None,
            cls_position=cls_position,
        )
        tok.load_timm_state(vit)
        return tok

    def load_timm_state(self, vit: nn.Module) -> None:
        """Copy patch-embedding weights, cls/register tokens and the position table from a timm ViT."""
        with torch.no_grad():
            self.patch_embed.proj.load_state_dict(vit.patch_embed.proj.state_dict())
            for name in ("cls_token", "reg_token", "pos_embed"):
                src, dst = getattr(vit, name, None), getattr(self, name, None)
                if (src is None) != (dst is None):
                    raise ValueError(
                        f"timm model and tokenizer disagree on {name}: {src is not None} vs {dst is not None}"
                    )
                if src is not None:
                    if src.shape != dst.shape:
                        raise ValueError(f"{name}: timm has {tuple(src.shape)}, tokenizer has {tuple(dst.shape)}")
                    dst.copy_(src)

    def _positions(self, h: int, w: int) -> torch.Tensor | None:
        if self.pos_embed is None:
            return None
        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=[h, w],
            old_size=list(self.grid_size),
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
        )

    def forward(self, images: torch.Tensor) -> Tokens:
        """``images [B, C, H, W]`` -> `Tokens` ``[B, P + h*w, D]`` (H, W multiples of the patch size)."""
        images = check_images(
            images,
            self.in_chans,
            self.patch_embed.patch_size,
            "image_patches",
            dtype=self.patch_embed.proj.weight.dtype,
            allow_nonfinite=self.allow_nonfinite,
        )
        x = self.patch_embed(images)  # [B, h, w, D]
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        if self.cls_position == "last":
            return self._cls_last(x, h, w)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(b, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        pos_embed = self._positions(h, w)
        if pos_embed is not None and self.no_embed_class:
            x = x + pos_embed
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        if pos_embed is not None and not self.no_embed_class:
            x = x + pos_embed
        return Tokens(
            x=x,
            pos=self.token_positions(b, h, w, x.device),
            grid=(h, w),
            num_prefix=self.num_prefix_tokens,
            modality="image",
        )

    def _cls_last(self, x: torch.Tensor, h: int, w: int) -> Tokens:
        """Patches ``[B, h*w, D]`` -> `Tokens` ``[B, h*w + 1, D]`` with the class token after them."""
        b = x.shape[0]
        cls = self.cls_token.expand(b, -1, -1)
        pos_embed = self._positions(h, w)  # cls entry first unless no_embed_class
        if pos_embed is not None:
            if self.no_embed_class:
                x = x + pos_embed
            else:
                x = x + pos_embed[:, 1:]
                cls = cls + pos_embed[:, :1]
        x = torch.cat([x, cls], dim=1)
        return Tokens(
            x=x, pos=self.token_positions(b, h, w, x.device), grid=(h, w), num_prefix=0, num_suffix=1, modality="image"
        )

    def token_positions(self, batch: int, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        """``[B, N, 2]`` (row, col) of each token; special tokens (cls, registers) at (-1, -1)."""
        rows, cols = torch.meshgrid(
            torch.arange(h, device=device, dtype=torch.float32),
            torch.arange(w, device=device, dtype=torch.float32),
            indexing="ij",
        )
        grid = torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        special = torch.full((self.num_prefix_tokens, 2), -1.0, device=device)
        parts = [grid, special] if self.cls_position == "last" else [special, grid]
        return torch.cat(parts, dim=0).unsqueeze(0).expand(batch, -1, -1)

    def num_tokens(self, img_size: tuple[int, int] | int) -> int:
        """Token count for an image of `img_size`."""
        hw = (img_size, img_size) if isinstance(img_size, int) else img_size
        p = self.patch_embed.patch_size
        return self.num_prefix_tokens + math.prod(s // q for s, q in zip(hw, p))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``images [B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]``, row-major patches, each laid out ``(row, col, channel)``
    inside the patch: the layout of MAE and HF ``ViTMAEForPreTraining.patchify`` (what their pixel targets use).

    ``H`` and ``W`` must be multiples of ``patch_size`` (non-square images are fine)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"patchify expects images [B, C, H, W], got shape {tuple(getattr(images, 'shape', ()))}")
    b, c, h, w = images.shape
    p = int(patch_size)
    if p < 1 or h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, q, C]
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of `patchify`: ``patches [B, h*w, p*p*C]`` on a ``grid (h, w)`` -> ``images [B, C, h*p, w*p]``."""
    if not isinstance(patches, torch.Tensor) or patches.dim() != 3:
        raise ValueError(f"unpatchify expects patches [B, N, p*p*C], got shape {tuple(getattr(patches, 'shape', ()))}")
    b, n, d = patches.shape
    p = int(patch_size)
    gh, gw = (int(g) for g in grid)
    if gh * gw != n:
        raise ValueError(f"unpatchify: {n} patches do not fill the grid {gh}x{gw} ({gh * gw} patches)")
    if p < 1 or d % (p * p):
        raise ValueError(f"unpatchify: patch width {d} is not p*p*C for patch_size={patch_size}")
    c = d // (p * p)
    x = patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, q]
    return x.reshape(b, c, gh * p, gw * p)

"""Backbones: timm's own ViT blocks, reused as they are (never rewritten)."""

from __future__ import annotations

import os
from typing import Any

import timm
from torch import nn

from tokenizers_mm import ImagePatches, Tokens

from ..layers.masks import padding_bias

__all__ = ["TimmViT", "create_timm_vit"]


def create_timm_vit(
    name: str = "vit_tiny_patch16_224", *, checkpoint_path: str | os.PathLike | None = None, **kwargs: Any
) -> nn.Module:
    """`timm.create_model(name, pretrained=False, ...)` as a headless, dynamic-size ViT.

    `kwargs` go to timm (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate``,
    ``reg_tokens``, ...). `checkpoint_path` loads local weights (safetensors or a weights-only torch file) through
    timm's loader; nothing is downloaded.
    """
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}; e.g. {timm.list_models('vit_*')[:8]} (timm.list_models())")
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint_path is not None:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"backbone checkpoint {checkpoint_path} does not exist")
        timm.models.load_checkpoint(model, str(checkpoint_path), strict=False)
    for attr in ("blocks", "norm", "patch_embed"):
        if not hasattr(model, attr):
            raise ValueError(f"timm model {name!r} has no `{attr}`: a ViT-style model (VisionTransformer) is needed")
    return model


class TimmViT(nn.Module):
    """The transformer part of a timm `VisionTransformer`: its `norm_pre`, its blocks and its final norm.

    The tokenizer (`ImagePatches.from_timm`) takes the patch embedding; `MMEncoder` runs the blocks, inserts the
    LLM stage and applies `norm` itself, so the final norm stays where the center paper needs it.

    Args:
        name: a timm ViT name (``vit_tiny_patch16_224``, ``vit_small_patch16_224``, ...).
        checkpoint_path: optional local weights.
        image_tokenizer: keep the ViT's patch embedding for `make_tokenizer`; False drops it (the blocks serve
            another modality's tokenizer: AST audio patches, VideoMAE tubelets, motion).
        kwargs: timm model arguments (custom depth / width / image and patch size).
    """

    def __init__(
        self,
        name: str = "vit_tiny_patch16_224",
        checkpoint_path: str | None = None,
        *,
        vit: nn.Module | None = None,
        image_tokenizer: bool = True,
        **kwargs: Any,
    ):
        super().__init__()
        if vit is None:
            vit = create_timm_vit(name, checkpoint_path=checkpoint_path, **kwargs)
        self.name = name
        self.embed_dim = vit.embed_dim
        self.norm_pre = vit.norm_pre
        self.blocks = nn.ModuleList(list(vit.blocks))
        self.norm = vit.norm
        self._tokenizer = ImagePatches.from_timm(vit) if image_tokenizer else None
        self.timm_config = {"name": name, **kwargs}

    @classmethod
    def from_timm(cls, vit: nn.Module) -> TimmViT:
        """Wrap an already built timm `VisionTransformer` (its modules are shared, not copied)."""
        return cls(type(vit).__name__, vit=vit)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def make_tokenizer(self) -> ImagePatches:
        """An `image_patches` tokenizer holding this model's patch embedding, tokens and positions."""
        if self._tokenizer is None:
            raise ValueError("this TimmViT was built with image_tokenizer=False: it has no patch embedding")
        return self._tokenizer

    def forward_block(self, index: int, tokens: Tokens) -> Tokens:
        return tokens.with_x(self.blocks[index](tokens.x, attn_mask=padding_bias(tokens)))

    def forward(self, tokens: Tokens) -> Tokens:
        """All blocks, no final norm; padded tokens (``tokens.mask``) are masked as keys. ``[B, N, D] -> [B, N, D]``."""
        x = self.norm_pre(tokens.x)
        attn_mask = padding_bias(tokens)
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask)
        return tokens.with_x(x)

    def extra_repr(self) -> str:
        return f"name={self.name}, depth={self.depth}, embed_dim={self.embed_dim}"

"""A stack of timm's own ViT blocks, sized freely (width, depth, heads, MLP width, LayerNorm eps, activation).

AST, VideoMAE and motion encoders are timm ViT blocks behind another modality's tokenizer. `vit_block_stack` builds
them from timm's `VisionTransformer` (so the blocks are timm's `Block`, attention never rewritten) with a 1x1
single-channel patch embedding and no tokens or positions: only the blocks and norms are meant to be used.
"""

from __future__ import annotations

import functools
from typing import Any

from timm.layers import LayerNorm, QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["HF_ACTIVATIONS", "vit_block_stack"]

#: HF `hidden_act` names -> activation modules that compute the same function.
HF_ACTIVATIONS: dict[str, Any] = {
    "gelu": nn.GELU,
    "gelu_new": functools.partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def vit_block_stack(
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_hidden_dim: int | None = None,
    qkv_bias: bool = True,
    norm_eps: float = 1e-6,
    act: str = "gelu",
    drop_path_rate: float = 0.0,
    final_norm: bool = True,
) -> tuple[VisionTransformer, dict[str, Any]]:
    """timm's `VisionTransformer` reduced to its blocks: ``(vit, sizes)``, the sizes as a dict for reporting.

    Args:
        embed_dim, depth, num_heads: transformer size (``embed_dim % num_heads == 0``).
        mlp_hidden_dim: MLP width (default ``4 * embed_dim``).
        qkv_bias: biases on the fused qkv projection.
        norm_eps: LayerNorm eps of every norm (timm: 1e-6; HF AST / VideoMAE: 1e-12).
        act: HF-style activation name (a key of `HF_ACTIVATIONS`).
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        final_norm: a final LayerNorm (False: ``nn.Identity``, e.g. VideoMAE with mean pooling).

    The model's ``blocks`` are ``[B, N, D] -> [B, N, D]`` (with an optional additive ``attn_mask``); timm's ViT init.
    """
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(HF_ACTIVATIONS)}, got {act!r}")
    hidden = 4 * embed_dim if mlp_hidden_dim is None else int(mlp_hidden_dim)
    # timm sizes the MLP as int(dim * mlp_ratio): nudge the ratio so that lands exactly on `hidden`.
    mlp_ratio = hidden / embed_dim
    if int(embed_dim * mlp_ratio) != hidden:
        mlp_ratio = (hidden + 0.5) / embed_dim
    sizes = dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        drop_path_rate=drop_path_rate,
        final_norm=final_norm,
    )
    vit = VisionTransformer(
        img_size=1,
        patch_size=1,
        in_chans=1,
        num_classes=0,
        global_pool="",
        class_token=False,
        pos_embed="none",
        norm_layer=functools.partial(LayerNorm, eps=norm_eps),
        act_layer=HF_ACTIVATIONS[act],
        **sizes,
    )
    return vit, {**sizes, "norm_eps": norm_eps, "act": act}

"""Point-BERT's transformer: timm's ViT blocks with the centre-MLP position embedding added at every block input."""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from tokenizers_mm import Tokens, create_tokenizer
from tokenizers_mm.points import centre_positions

from .base import BackboneBase
from .registry import register_backbone

__all__ = ["PointTransformer"]


@register_backbone("point_transformer", tokenizer="points", any_tokenizer=False)
class PointTransformer(BackboneBase):
    """Transformer over point-group tokens (Point-BERT / Point-MAE layout), built from timm's `Block`.

    Unlike a ViT, the positions are added again before every block: ``x_{i+1} = block_i(x_i + pos)``, with
    ``pos = MLP(centre)`` (and a learned position for the cls token). Its tokenizer is `points` built with
    ``add_pos=False`` (`make_tokenizer`); `MMEncoder` calls `block_positions` once and adds them before each block.

    Args:
        embed_dim, depth, num_heads, mlp_ratio: transformer size (Point-BERT: 384, 12, 6, 4).
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        class_token: whether the tokens carry a cls token (its position is learned).
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        class_token: bool = True,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.class_token = class_token
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.pos_mlp = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        if self.cls_pos is not None:
            trunc_normal_(self.cls_pos, std=0.02)

    def block_positions(self, tokens: Tokens) -> torch.Tensor:
        """The positions added before every block, ``[B, N, D]``, from the group centres in ``tokens.pos``."""
        if tokens.pos is None or tokens.pos.shape[-1] != 3:
            raise ValueError("PointTransformer needs tokens whose pos holds the (x, y, z) group centres")
        return centre_positions(self.pos_mlp, self.cls_pos, tokens)

    def make_tokenizer(self, **kwargs: Any) -> nn.Module:
        """The `points` tokenizer these blocks expect (this width and cls setting, positions left to the blocks);
        `kwargs` set the grouping (``num_groups``, ``group_size``, ...)."""
        return create_tokenizer(
            "points", **{"embed_dim": self.embed_dim, "class_token": self.class_token, "add_pos": False, **kwargs}
        )

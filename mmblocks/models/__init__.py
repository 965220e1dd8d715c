"""Backbones and encoder composition."""

from .backbones import TimmViT, create_timm_vit
from .encoder import LLMStage, MMEncoder
from .point_transformer import PointTransformer

__all__ = ["LLMStage", "MMEncoder", "PointTransformer", "TimmViT", "create_timm_vit"]

from .ast import AST_PRESETS, ast_backbone, ast_from_hf, timm_vit_blocks
from .videomae import VIDEOMAE_PRESETS, videomae_backbone, videomae_from_hf

__all__ += [
    "AST_PRESETS",
    "VIDEOMAE_PRESETS",
    "ast_backbone",
    "ast_from_hf",
    "timm_vit_blocks",
    "videomae_backbone",
    "videomae_from_hf",
]

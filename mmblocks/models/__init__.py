"""Backbones and encoder composition."""

from .backbones import TimmViT, create_timm_vit
from .encoder import LLMStage, MMEncoder
from .point_transformer import PointTransformer

__all__ = ["LLMStage", "MMEncoder", "PointTransformer", "TimmViT", "create_timm_vit"]

from ..layers.rope import AxialRoPE, apply_rotary, axial_rope, sequence_rope
from ..layers.soft_mask import SoftMaskSchedule, advance_soft_masks
from .ast import AST_PRESETS, ast_backbone, ast_from_hf, timm_vit_blocks
from .causal_vit import CAUSAL_VIT_PRESETS, CausalViT, causal_vit
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

__all__ += [
    "CAUSAL_VIT_PRESETS",
    "AxialRoPE",
    "CausalViT",
    "SoftMaskSchedule",
    "advance_soft_masks",
    "apply_rotary",
    "axial_rope",
    "causal_vit",
    "sequence_rope",
]

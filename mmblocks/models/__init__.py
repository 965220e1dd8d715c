"""Backbones (registered by name: `create_backbone`, `list_backbones`), encoder composition (`MMEncoder`) and the
text towers of contrastive models (`create_text_tower`, `list_text_towers`)."""

from ..layers.rope import AxialRoPE, apply_rotary, axial_rope, sequence_rope
from ..layers.soft_mask import SoftMaskSchedule, advance_soft_masks
from .ast import AST_PRESETS, AST_TOKENIZER, ast_backbone, ast_from_hf, ast_tokenizer, build_ast, timm_vit_blocks
from .backbones import TimmViT, create_timm_vit, vit
from .base import Backbone, BackboneBase, check_backbone
from .causal_vit import CAUSAL_VIT_PRESETS, CausalViT, causal_vit
from .contrastive import ContrastiveModel
from .encoder import LLMStage, MMEncoder
from .point_transformer import PointTransformer
from .registry import BACKBONES, builder_args, create_backbone, list_backbones, register_backbone, resolve_backbone
from .text_towers import (
    TEXT_TOWERS,
    LLMBlocksTower,
    MiniLMTower,
    OpenCLIPTextTower,
    TextTower,
    create_text_tower,
    list_text_towers,
    register_text_tower,
)
from .videomae import (
    VIDEOMAE_PRESETS,
    VIDEOMAE_TUBELETS,
    build_videomae,
    videomae_backbone,
    videomae_from_hf,
    videomae_tokenizer,
)

__all__ = [
    "AST_PRESETS",
    "AST_TOKENIZER",
    "BACKBONES",
    "TEXT_TOWERS",
    "ContrastiveModel",
    "LLMBlocksTower",
    "MiniLMTower",
    "OpenCLIPTextTower",
    "TextTower",
    "create_text_tower",
    "list_text_towers",
    "register_text_tower",
    "builder_args",
    "CAUSAL_VIT_PRESETS",
    "VIDEOMAE_PRESETS",
    "VIDEOMAE_TUBELETS",
    "AxialRoPE",
    "Backbone",
    "BackboneBase",
    "CausalViT",
    "LLMStage",
    "MMEncoder",
    "PointTransformer",
    "SoftMaskSchedule",
    "TimmViT",
    "advance_soft_masks",
    "apply_rotary",
    "ast_tokenizer",
    "build_ast",
    "build_videomae",
    "ast_backbone",
    "ast_from_hf",
    "axial_rope",
    "causal_vit",
    "check_backbone",
    "create_backbone",
    "create_timm_vit",
    "list_backbones",
    "register_backbone",
    "resolve_backbone",
    "sequence_rope",
    "timm_vit_blocks",
    "videomae_tokenizer",
    "videomae_backbone",
    "videomae_from_hf",
    "vit",
]

"""Backbones and encoder composition."""

from .backbones import TimmViT, create_timm_vit
from .encoder import LLMStage, MMEncoder
from .point_transformer import PointTransformer

__all__ = ["LLMStage", "MMEncoder", "PointTransformer", "TimmViT", "create_timm_vit"]

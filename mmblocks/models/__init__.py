"""Backbones and encoder composition."""

from .backbones import TimmViT, create_timm_vit
from .encoder import LLMStage, MMEncoder

__all__ = ["LLMStage", "MMEncoder", "TimmViT", "create_timm_vit"]

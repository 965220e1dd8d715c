"""Modality tokenizers and the `Tokens` container they produce.

This package never imports `adapters` or `mmblocks` (dependencies flow tokenizers_mm <- adapters <- mmblocks).
"""

from .image import ImagePatches
from .registry import create_tokenizer, list_tokenizers, register_tokenizer
from .tokens import Tokens

__all__ = ["ImagePatches", "Tokens", "create_tokenizer", "list_tokenizers", "register_tokenizer"]

"""Modality tokenizers and the `Tokens` container they produce.

This package never imports `adapters` or `mmblocks` (dependencies flow tokenizers_mm <- adapters <- mmblocks).
"""

from .tokens import Tokens

__all__ = ["Tokens"]

"""mmblocks: non-text modalities through the transformer blocks of pretrained language models."""

from .builders import build_encoder, vit_small_llm_last, vit_tiny_llm_last
from .config import ConfigError, load_config
from .llm import LLMBlocks, load_blocks
from .models import LLMStage, MMEncoder, TimmViT

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "LLMBlocks",
    "LLMStage",
    "MMEncoder",
    "TimmViT",
    "__version__",
    "build_encoder",
    "load_blocks",
    "load_config",
    "vit_small_llm_last",
    "vit_tiny_llm_last",
]

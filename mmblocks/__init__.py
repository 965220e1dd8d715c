"""mmblocks: non-text modalities through the transformer blocks of pretrained language models."""

from .llm import LLMBlocks, load_blocks

__version__ = "0.1.0"

__all__ = ["LLMBlocks", "load_blocks", "__version__"]

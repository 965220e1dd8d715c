"""mmblocks: non-text modalities through the transformer blocks of pretrained language models."""

from .builders import (
    ast_llm,
    build_encoder,
    build_task,
    point_bert_llm,
    videomae_llm,
    vit_small_llm_last,
    vit_tiny_llm_last,
)
from .config import ConfigError, load_config
from .errors import MMBlocksError
from .llm import LLMBlocks, load_blocks
from .models import LLMStage, MMEncoder, TimmViT, create_backbone, list_backbones
from .tasks import Task, create_task, list_tasks

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "LLMBlocks",
    "LLMStage",
    "MMBlocksError",
    "MMEncoder",
    "Task",
    "TimmViT",
    "__version__",
    "ast_llm",
    "build_encoder",
    "build_task",
    "create_backbone",
    "create_task",
    "list_backbones",
    "list_tasks",
    "load_blocks",
    "load_config",
    "point_bert_llm",
    "videomae_llm",
    "vit_small_llm_last",
    "vit_tiny_llm_last",
]

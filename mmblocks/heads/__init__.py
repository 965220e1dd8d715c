"""Heads on top of `Tokens`, registered by name (`create_head`, `list_heads`)."""

from .classification import POOLING, ClassifierHead, Pooling, pool_tokens
from .code_lm import CodeLMHead, CodeLMOutput
from .contrastive import CONTRASTIVE_PROJECTIONS, ContrastiveHead
from .ctc import CharVocab, CTCHead, CTCOutput
from .prefix_lm import IGNORE_INDEX, PrefixLMHead, PrefixLMOutput, SplicedBatch
from .prompt import PLACEHOLDER_ID, PromptFormat
from .reconstruction import RECONSTRUCTION_TARGETS, ReconstructionHead, ReconstructionOutput
from .registry import HEADS, create_head, list_heads, register_head

__all__ = [
    "HEADS",
    "IGNORE_INDEX",
    "PLACEHOLDER_ID",
    "POOLING",
    "CONTRASTIVE_PROJECTIONS",
    "CharVocab",
    "ClassifierHead",
    "CodeLMHead",
    "CodeLMOutput",
    "ContrastiveHead",
    "CTCHead",
    "CTCOutput",
    "Pooling",
    "PrefixLMHead",
    "PrefixLMOutput",
    "PromptFormat",
    "RECONSTRUCTION_TARGETS",
    "ReconstructionHead",
    "ReconstructionOutput",
    "SplicedBatch",
    "create_head",
    "list_heads",
    "pool_tokens",
    "register_head",
]

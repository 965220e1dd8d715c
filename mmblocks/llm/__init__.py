"""LLM blocks: transformer layers of pretrained language models as reusable encoder layers."""

from ..layers.masks import ATTENTION_MODES, AttentionMode
from ..layers.norms import UnitRMSNorm
from .blocks import FINAL_NORMS, ROPE_MODES, FinalNorm, LLMBlocks, RopeMode
from .discovery import discover, get_family, list_families, tiny_config
from .families import ENTRIES, FamilyEntry, FamilySpec, UnknownFamilyError
from .lm import LM_TUNE_MODES, lm_layers, load_lm, load_tokenizer, set_lm_checkpointing
from .load import DTYPES, load_blocks, resolve_layers
from .sources import (
    MissingDependencyError,
    MissingWeightsError,
    SourceError,
    cache_dir,
    list_offline_models,
    resolve_source,
)
from .tuning import (
    TUNE_KWARGS,
    TUNE_MODES,
    GatedLayer,
    InterpolatedLayer,
    TuneMode,
    lora_target_modules,
    lora_target_parameters,
    scramble_weights,
)

__all__ = [
    "ATTENTION_MODES",
    "DTYPES",
    "ENTRIES",
    "FINAL_NORMS",
    "LM_TUNE_MODES",
    "ROPE_MODES",
    "TUNE_KWARGS",
    "TUNE_MODES",
    "AttentionMode",
    "FinalNorm",
    "RopeMode",
    "TuneMode",
    "FamilyEntry",
    "FamilySpec",
    "GatedLayer",
    "InterpolatedLayer",
    "LLMBlocks",
    "MissingDependencyError",
    "MissingWeightsError",
    "SourceError",
    "UnitRMSNorm",
    "UnknownFamilyError",
    "cache_dir",
    "discover",
    "get_family",
    "list_families",
    "list_offline_models",
    "lm_layers",
    "load_blocks",
    "load_lm",
    "load_tokenizer",
    "lora_target_modules",
    "lora_target_parameters",
    "resolve_layers",
    "resolve_source",
    "scramble_weights",
    "set_lm_checkpointing",
    "tiny_config",
]

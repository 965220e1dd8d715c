"""Shared building blocks that `mmblocks.llm` and `mmblocks.models` both use (timm's `layers/`, torchtune's
`modules/`): attention masks and modes, masked attention, rotary variants, soft-mask schedules, norms and the timm
ViT block stack. Nothing here imports the rest of `mmblocks` (`tests/test_import_floors.py`)."""

from .attention import masked_attention
from .masks import (
    ATTENTION_MODES,
    CAUSAL_IMPLS,
    AttentionMode,
    CausalImpl,
    backend_supports,
    build_attention_mask,
    check_backend,
    layer_attention_kwargs,
    padding_bias,
    soft_mask_bias,
    soft_mask_matrix,
    soft_mask_weights,
)
from .norms import UnitRMSNorm, is_norm_module
from .rope import AxialRoPE, apply_rotary, axial_rope, grid_positions, sequence_rope
from .soft_mask import SOFT_MASK_MODES, SOFT_MASK_UNITS, SoftMaskSchedule, advance_soft_masks, soft_mask_modules
from .vit_blocks import HF_ACTIVATIONS, vit_block_stack

__all__ = [
    "ATTENTION_MODES",
    "CAUSAL_IMPLS",
    "HF_ACTIVATIONS",
    "SOFT_MASK_MODES",
    "SOFT_MASK_UNITS",
    "AttentionMode",
    "AxialRoPE",
    "CausalImpl",
    "SoftMaskSchedule",
    "UnitRMSNorm",
    "advance_soft_masks",
    "apply_rotary",
    "axial_rope",
    "backend_supports",
    "build_attention_mask",
    "check_backend",
    "grid_positions",
    "is_norm_module",
    "layer_attention_kwargs",
    "masked_attention",
    "padding_bias",
    "sequence_rope",
    "soft_mask_bias",
    "soft_mask_matrix",
    "soft_mask_modules",
    "soft_mask_weights",
    "vit_block_stack",
]

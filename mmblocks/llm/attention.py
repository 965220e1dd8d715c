"""Attention masks for `LLMBlocks`, built by `transformers`' own per-backend mask functions.

Why this file exists: for a decoder attention module, `attention_mask=None` means *causal* under SDPA and
flash attention (they fall back on `module.is_causal`) but *bidirectional* under eager (no mask is added).
`LLMBlocks` therefore never relies on a backend default: it sets every attention module's `is_causal` flag to
the chosen mode and passes the mask that `transformers.masking_utils` builds for the active backend (a float
additive mask for eager, a bool mask or `None` for SDPA, a 2-D padding mask or `None` for flash, a
`BlockMask` for flex).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import masking_utils as mu

__all__ = ["ATTENTION_MODES", "AttentionMode", "build_attention_mask", "set_causal_flags"]

AttentionMode = Literal["bidirectional", "causal"]
ATTENTION_MODES: tuple[str, ...] = ("bidirectional", "causal")


def _mask_function(mode: str, sliding_window: int | None):
    if mode == "causal":
        if sliding_window:
            return mu.sliding_window_causal_mask_function(sliding_window)
        return mu.causal_mask_function
    if sliding_window:
        return mu.sliding_window_bidirectional_mask_function(sliding_window)
    return mu.bidirectional_mask_function


def build_attention_mask(
    attn_implementation: str,
    mode: str,
    batch_size: int,
    num_tokens: int,
    padding_mask: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
) -> Any:
    """The attention mask the `attn_implementation` backend expects for `mode` (`None` when the module's
    `is_causal` flag alone expresses it).

    Args:
        padding_mask: ``[B, N]`` bool, True = real token, or `None`.
        sliding_window: local attention span of the layer, or `None` for full attention.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    builder = mu.ALL_MASK_ATTENTION_FUNCTIONS.get(attn_implementation, mu.sdpa_mask)
    return builder(
        batch_size=batch_size,
        q_length=num_tokens,
        kv_length=num_tokens,
        mask_function=_mask_function(mode, sliding_window),
        attention_mask=padding_mask,
        local_size=sliding_window,
        allow_is_causal_skip=mode == "causal",
        allow_is_bidirectional_skip=mode == "bidirectional",
        dtype=dtype,
        device=device,
    )


def set_causal_flags(module: nn.Module, causal: bool) -> int:
    """Set `is_causal` on every attention module below `module`; returns how many were set."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "is_causal") and isinstance(sub.is_causal, bool):
            sub.is_causal = causal
            count += 1
    return count

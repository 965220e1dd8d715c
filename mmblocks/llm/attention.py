"""Attention backends for `LLMBlocks`: iLLaMA's post-softmax mask as a `transformers` attention function, and the
modules' `is_causal` flags.

The masks themselves (modes, padding, soft masks, which backend runs which mode) are built in
`mmblocks.layers.masks`. ``post_softmax_mult`` needs the attention weights, so it runs the family's own eager attention
through a wrapper (`eager_post_softmax_mult`, registered in `transformers`' `AttentionInterface` as
``POST_SOFTMAX_MULT_IMPL``) that re-weights them by ``M`` (the layer keyword
`mmblocks.layers.masks.POST_SOFTMAX_MULT_KWARG`) and recomputes ``weights @ V``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers import masking_utils as mu

from ..layers.masks import POST_SOFTMAX_MULT_KWARG

__all__ = ["POST_SOFTMAX_MULT_IMPL", "eager_post_softmax_mult", "set_causal_flags"]

POST_SOFTMAX_MULT_IMPL = "mmblocks_eager_post_softmax_mult"


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def eager_post_softmax_mult(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An `AttentionInterface` function: the family's own eager attention (its scaling, soft-capping, dropout,
    additive padding / window mask), with the softmax weights then multiplied by ``M`` (keyword
    ``POST_SOFTMAX_MULT_KWARG``, ``[B | 1, 1, N, N]``) and no renormalisation. Without ``M`` it is plain eager.

    Returns ``(output [B, N, H, d], weights [B, H, N, N])`` as every eager function does.
    """
    weights_mult = kwargs.pop(POST_SOFTMAX_MULT_KWARG, None)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__} ({type(module).__module__}) has no module-level eager_attention_forward; "
            "post_softmax_mult cannot wrap its attention"
        )
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    if weights_mult is None:
        raise RuntimeError(
            f"{type(module).__name__} was set up for post_softmax_mult attention but received no mask weights: its "
            "layer does not pass keyword arguments through to the attention function"
        )
    if weights is None:
        raise RuntimeError(
            f"{type(module).__name__}'s eager attention returned no weights; post_softmax_mult needs them"
        )
    weights = weights * weights_mult.to(weights.dtype)
    v = _repeat_kv(value, weights.shape[1] // value.shape[1])
    out = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, weights


AttentionInterface.register(POST_SOFTMAX_MULT_IMPL, eager_post_softmax_mult)
mu.AttentionMaskInterface.register(POST_SOFTMAX_MULT_IMPL, mu.eager_mask)


def set_causal_flags(module: nn.Module, causal: bool) -> int:
    """Set `is_causal` on every attention module below `module`; returns how many were set."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "is_causal") and isinstance(sub.is_causal, bool):
            sub.is_causal = causal
            count += 1
    return count

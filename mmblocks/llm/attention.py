"""Attention modes and masks for `LLMBlocks` (and the causal ViT), built by `transformers`' own mask functions.

Why this file exists: for a decoder attention module, `attention_mask=None` means *causal* under SDPA and
flash attention (they fall back on `module.is_causal`) but *bidirectional* under eager (no mask is added).
`LLMBlocks` therefore never relies on a backend default: it sets every attention module's `is_causal` flag to
the chosen mode and passes the mask that `transformers.masking_utils` builds for the active backend (a float
additive mask for eager, a bool mask or `None` for SDPA, a 2-D padding mask or `None` for flash, a
`BlockMask` for flex).

Modes (`ATTENTION_MODES`):

* ``bidirectional``: every token sees every (real) token.
* ``causal``: token ``i`` sees tokens ``j <= i``, in one of two implementations (`CAUSAL_IMPLS`):
  ``pre_softmax`` (the standard additive mask, strictly causal) or ``post_softmax_mult`` (iLLaMA's released
  code, `models/illama.py`: softmax over *all* tokens, then the weights are multiplied by the mask with no
  renormalisation; the normaliser of row ``i`` still sees the scores of later tokens, so this is *not* strictly
  causal, and rows sum to less than 1).
* ``soft``: iLLaMA's soft mask with mix ratio ``r`` (`mmblocks.models.soft_mask.SoftMaskSchedule`): the mask
  weights are ``M = r * ones + (1 - r) * tril`` (`soft_mask_weights`); ``r = 1`` is bidirectional and ``r = 0``
  the chosen causal implementation. ``post_softmax_mult`` multiplies the softmax by ``M`` (iLLaMA);
  ``pre_softmax`` adds ``log M`` to the scores, i.e. multiplies by ``M`` *and renormalises* (future tokens are
  down-weighted by ``r`` relative to past ones). In `LLMBlocks` the weights are ``r * A_bi + (1 - r) * A_causal``
  (`soft_mask_matrix`, the 0/1 masks `transformers` builds, so padding and sliding windows stay exact at both ends).

Which backend runs which mode in `LLMBlocks` (`backend_supports`):

| mode | eager | sdpa | flex | flash |
|---|---|---|---|---|
| bidirectional, causal (pre_softmax) | yes | yes | yes | yes |
| soft (pre_softmax): float additive mask | yes | yes | yes (score_mod; untested on CPU here) | no |
| causal / soft (post_softmax_mult) | yes | no | no | no |

``post_softmax_mult`` needs the attention weights, so it runs the family's own eager attention through a
wrapper (`eager_post_softmax_mult`, registered in `transformers`' `AttentionInterface` as
``POST_SOFTMAX_MULT_IMPL``) that re-weights them by ``M`` (passed as the layer keyword ``POST_SOFTMAX_MULT_KWARG``)
and recomputes ``weights @ V``.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers import masking_utils as mu

__all__ = [
    "ATTENTION_MODES",
    "AttentionMode",
    "CAUSAL_IMPLS",
    "POST_SOFTMAX_MULT_IMPL",
    "POST_SOFTMAX_MULT_KWARG",
    "backend_supports",
    "build_attention_mask",
    "check_backend",
    "eager_post_softmax_mult",
    "layer_attention_kwargs",
    "masked_attention",
    "set_causal_flags",
    "soft_mask_bias",
    "soft_mask_matrix",
    "soft_mask_weights",
    "uses_post_softmax_mult",
]

AttentionMode = Literal["bidirectional", "causal", "soft"]
ATTENTION_MODES: tuple[str, ...] = ("bidirectional", "causal", "soft")
CAUSAL_IMPLS: tuple[str, ...] = ("pre_softmax", "post_softmax_mult")

POST_SOFTMAX_MULT_IMPL = "mmblocks_eager_post_softmax_mult"
POST_SOFTMAX_MULT_KWARG = "mmblocks_post_softmax_mult"


def _check_mode(mode: str, causal_impl: str = "pre_softmax") -> None:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    if causal_impl not in CAUSAL_IMPLS:
        raise ValueError(f"causal_impl must be one of {CAUSAL_IMPLS}, got {causal_impl!r}")


# ------------------------------------------------------------------------------------------------ masks
def soft_mask_weights(
    ratio: float | torch.Tensor, n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """iLLaMA's mask ``M = r * ones + (1 - r) * tril`` ``[n, n]`` (``r = 1``: all ones, ``r = 0``: lower
    triangle). `ratio` may be a 0-d tensor (no host sync)."""
    tril = torch.ones(n, n, device=device, dtype=dtype).tril()
    r = torch.as_tensor(ratio, device=device, dtype=dtype)
    return r + (1.0 - r) * tril


def soft_mask_bias(
    ratio: float | torch.Tensor, n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``log M`` ``[n, n]`` as an additive pre-softmax mask (0 where ``M = 1``; the dtype's minimum where
    ``M = 0``, as `transformers`' eager masks)."""
    weights = soft_mask_weights(ratio, n, device, torch.float32)
    return weights.log().clamp_min(torch.finfo(dtype).min).to(dtype)


def _allowed(
    mode: str, batch_size: int, n: int, padding_mask: torch.Tensor | None, sliding_window: int | None, device
) -> torch.Tensor:
    """``[B, 1, N, N]`` bool: the keys each query sees under `mode` (``bidirectional`` or ``causal``), padding and
    sliding window included (`transformers`' own mask functions)."""
    return mu.sdpa_mask(
        batch_size=batch_size,
        q_length=n,
        kv_length=n,
        mask_function=_mask_function(mode, sliding_window),
        attention_mask=padding_mask,
        local_size=sliding_window,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        device=device,
    )


def soft_mask_matrix(
    ratio: float | torch.Tensor,
    batch_size: int,
    num_tokens: int,
    padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The soft mask weights of an `LLMBlocks` layer, ``[B, 1, N, N]``: ``r * A_bidirectional + (1 - r) *
    A_causal`` with ``A`` the 0/1 masks `transformers` builds for the two modes (padding and sliding window
    included). Without padding or window it is `soft_mask_weights`; with a window it keeps both end points exact
    (`transformers`' causal window reaches ``window - 1`` tokens back, its bidirectional window ``window``)."""
    bi = _allowed("bidirectional", batch_size, num_tokens, padding_mask, sliding_window, device)
    ca = _allowed("causal", batch_size, num_tokens, padding_mask, sliding_window, device)
    r = torch.as_tensor(ratio, device=device, dtype=dtype)
    return r * bi.to(dtype) + (1.0 - r) * ca.to(dtype)


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
    ratio: float | torch.Tensor | None = None,
) -> Any:
    """The attention mask the `attn_implementation` backend expects for `mode` (`None` when the module's
    `is_causal` flag alone expresses it). This is the ``pre_softmax`` implementation.

    Args:
        padding_mask: ``[B, N]`` bool, True = real token, or `None`.
        sliding_window: local attention span of the layer, or `None` for full attention.
        ratio: the soft-mask ratio ``r`` (mode ``soft`` only): the mask is the float ``log M`` of
            `soft_mask_matrix` (``[B, 1, N, N]``, the dtype's minimum where ``M = 0``), for eager, SDPA and flex.
    """
    _check_mode(mode)
    if mode == "soft":
        check_backend(attn_implementation, mode, "pre_softmax")
        if ratio is None:
            raise ValueError("attention='soft' needs the mix ratio r (ratio=...)")
        weights = soft_mask_matrix(ratio, batch_size, num_tokens, padding_mask, sliding_window, device)
        mask = weights.log().clamp_min(torch.finfo(dtype).min).to(dtype)
        return mask.expand(batch_size, 1, num_tokens, num_tokens)
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


# ------------------------------------------------------------------------------------------------ backends
def uses_post_softmax_mult(mode: str, causal_impl: str) -> bool:
    """True when the mode needs the post-softmax multiplicative mask (causal or soft with ``post_softmax_mult``)."""
    return mode in ("causal", "soft") and causal_impl == "post_softmax_mult"


def backend_supports(attn_implementation: str, mode: str, causal_impl: str = "pre_softmax") -> bool:
    """Whether `LLMBlocks` can run `mode` / `causal_impl` on the `attn_implementation` backend (see the module
    docstring's table)."""
    _check_mode(mode, causal_impl)
    if uses_post_softmax_mult(mode, causal_impl):
        return attn_implementation == "eager"
    if mode == "soft":
        return attn_implementation in ("eager", "sdpa", "flex_attention")
    return True


def check_backend(attn_implementation: str, mode: str, causal_impl: str = "pre_softmax") -> None:
    """Raise a clear error when `backend_supports` says no."""
    if backend_supports(attn_implementation, mode, causal_impl):
        return
    if uses_post_softmax_mult(mode, causal_impl):
        raise ValueError(
            f"attention={mode!r} with causal_impl='post_softmax_mult' multiplies the softmax weights, which only "
            f"eager attention materialises; attn_implementation={attn_implementation!r} cannot run it. Load the blocks "
            "with attn_implementation='eager' (or call blocks.set_attn_implementation('eager')), or use "
            "causal_impl='pre_softmax'"
        )
    raise ValueError(
        f"attention='soft' adds a float mask (log of the soft mask) to the scores; attn_implementation="
        f"{attn_implementation!r} takes no float mask. Use 'eager', 'sdpa' or 'flex_attention'"
    )


def layer_attention_kwargs(
    attn_implementation: str,
    mode: str,
    causal_impl: str,
    batch_size: int,
    num_tokens: int,
    padding_mask: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
    ratio: float | torch.Tensor | None = None,
) -> dict[str, Any]:
    """The attention keywords of one layer call: ``attention_mask`` (and, for ``post_softmax_mult``, the mask
    weights ``M`` ``[B, 1, N, N]`` (`soft_mask_matrix`) under ``POST_SOFTMAX_MULT_KWARG``)."""
    _check_mode(mode, causal_impl)
    check_backend(attn_implementation, mode, causal_impl)
    if not uses_post_softmax_mult(mode, causal_impl):
        mask = build_attention_mask(
            attn_implementation,
            mode,
            batch_size,
            num_tokens,
            padding_mask,
            dtype,
            device,
            sliding_window=sliding_window,
            ratio=ratio,
        )
        return {"attention_mask": mask}
    if mode == "soft" and ratio is None:
        raise ValueError("attention='soft' needs the mix ratio r (ratio=...)")
    r = 0.0 if mode == "causal" else ratio
    mask = mu.eager_mask(
        batch_size=batch_size,
        q_length=num_tokens,
        kv_length=num_tokens,
        mask_function=_mask_function("bidirectional", sliding_window),
        attention_mask=padding_mask,
        local_size=sliding_window,
        allow_is_bidirectional_skip=True,
        dtype=dtype,
        device=device,
    )
    weights = soft_mask_matrix(r, batch_size, num_tokens, padding_mask, sliding_window, device, dtype)
    return {"attention_mask": mask, POST_SOFTMAX_MULT_KWARG: weights}


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


# ------------------------------------------------------------------------------------------------ functional
def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str = "bidirectional",
    causal_impl: str = "pre_softmax",
    ratio: float | torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Self-attention of ``q, k, v [B, H, N, d]`` under `mode` / `causal_impl` (the causal ViT's attention).

    Args:
        ratio: the soft-mask ratio ``r`` (``soft`` only; a float or a 0-d tensor).
        attn_mask: an additive padding mask broadcastable to ``[B, H, N, N]`` (e.g. ``[B, 1, 1, N]`` from
            `mmblocks.models.backbones.padding_bias`, -inf at padded keys), or None.
        scale: score scale (default ``d ** -0.5``).
        dropout_p: attention dropout (training only; the caller passes 0 in eval).

    ``pre_softmax`` runs `F.scaled_dot_product_attention` (``is_causal`` when nothing is padded, else a float
    mask); ``post_softmax_mult`` computes ``(softmax(q k^T * scale + attn_mask) * M) @ v`` explicitly. Returns
    ``[B, H, N, d]``.
    """
    _check_mode(mode, causal_impl)
    n = q.shape[-2]
    if mode == "soft" and ratio is None:
        raise ValueError("attention='soft' needs the mix ratio r (ratio=...)")
    if uses_post_softmax_mult(mode, causal_impl):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
        r = 0.0 if mode == "causal" else ratio
        weights = weights * soft_mask_weights(r, n, q.device, weights.dtype)
        return torch.matmul(weights, v)
    if mode == "bidirectional":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if mode == "causal" and attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    dtype = q.dtype
    bias = soft_mask_bias(0.0 if mode == "causal" else ratio, n, q.device, dtype)
    if attn_mask is not None:
        bias = (bias + attn_mask.to(dtype)).clamp_min(torch.finfo(dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def set_causal_flags(module: nn.Module, causal: bool) -> int:
    """Set `is_causal` on every attention module below `module`; returns how many were set."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "is_causal") and isinstance(sub.is_causal, bool):
            sub.is_causal = causal
            count += 1
    return count

"""Attention masks, built in one place: padding biases, causal / bidirectional / soft masks, and the masks a
`transformers` decoder layer takes for each attention backend.

Why the backend matters: for a decoder attention module, `attention_mask=None` means *causal* under SDPA and flash
attention (they fall back on `module.is_causal`) but *bidirectional* under eager (no mask is added). `LLMBlocks`
therefore never relies on a backend default: it sets every attention module's `is_causal` flag to the chosen mode and
passes the mask that `transformers.masking_utils` builds for the active backend (`build_attention_mask`: a float
additive mask for eager, a bool mask or `None` for SDPA, a 2-D padding mask or `None` for flash, a `BlockMask` for
flex).

Modes (`ATTENTION_MODES`):

* ``bidirectional``: every token sees every (real) token.
* ``causal``: token ``i`` sees tokens ``j <= i``, in one of two implementations (`CAUSAL_IMPLS`):
  ``pre_softmax`` (the standard additive mask, strictly causal) or ``post_softmax_mult`` (iLLaMA's released
  code, `models/illama.py`: softmax over *all* tokens, then the weights are multiplied by the mask with no
  renormalisation; the normaliser of row ``i`` still sees the scores of later tokens, so this is *not* strictly
  causal, and rows sum to less than 1).
* ``soft``: iLLaMA's soft mask with mix ratio ``r`` (`mmblocks.layers.soft_mask.SoftMaskSchedule`): the mask
  weights are ``M = r * ones + (1 - r) * tril`` (`soft_mask_weights`); ``r = 1`` is bidirectional and ``r = 0``
  the chosen causal implementation. ``post_softmax_mult`` multiplies the softmax by ``M`` (iLLaMA);
  ``pre_softmax`` adds ``log M`` to the scores, i.e. multiplies by ``M`` *and renormalises* (future tokens are
  down-weighted by ``r`` relative to past ones). For `LLMBlocks` the weights are ``r * A_bi + (1 - r) * A_causal``
  (`soft_mask_matrix`, the 0/1 masks `transformers` builds, so padding and sliding windows stay exact at both ends).

Which backend runs which mode in `LLMBlocks` (`backend_supports`):

| mode | eager | sdpa | flex | flash |
|---|---|---|---|---|
| bidirectional, causal (pre_softmax) | yes | yes | yes | yes |
| soft (pre_softmax): float additive mask | yes | yes | yes (score_mod; untested on CPU here) | no |
| causal / soft (post_softmax_mult) | yes | no | no | no |

``post_softmax_mult`` needs the attention weights: `layer_attention_kwargs` passes ``M`` to the layer under the
keyword ``POST_SOFTMAX_MULT_KWARG``, and `mmblocks.llm.attention` wraps the family's eager attention to apply it.

Timm-style blocks (backbones, the causal ViT) take an additive key-padding bias instead (`padding_bias`).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from transformers import masking_utils as mu

from tokenizers_mm import Tokens

__all__ = [
    "ATTENTION_MODES",
    "AttentionMode",
    "CAUSAL_IMPLS",
    "CausalImpl",
    "POST_SOFTMAX_MULT_KWARG",
    "backend_supports",
    "build_attention_mask",
    "check_backend",
    "check_mode",
    "layer_attention_kwargs",
    "padding_bias",
    "soft_mask_bias",
    "soft_mask_matrix",
    "soft_mask_weights",
    "uses_post_softmax_mult",
]

AttentionMode = Literal["bidirectional", "causal", "soft"]
ATTENTION_MODES: tuple[str, ...] = get_args(AttentionMode)
CausalImpl = Literal["pre_softmax", "post_softmax_mult"]
CAUSAL_IMPLS: tuple[str, ...] = get_args(CausalImpl)

POST_SOFTMAX_MULT_KWARG = "mmblocks_post_softmax_mult"


def check_mode(mode: str, causal_impl: str = "pre_softmax") -> None:
    """A clear error for an unknown attention mode or causal implementation."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    if causal_impl not in CAUSAL_IMPLS:
        raise ValueError(f"causal_impl must be one of {CAUSAL_IMPLS}, got {causal_impl!r}")


# ------------------------------------------------------------------------------------------------ padding
def padding_bias(tokens: Tokens) -> torch.Tensor | None:
    """The additive attention mask ``[B, 1, 1, N]`` (-inf at padded keys) that timm blocks take for ``tokens.mask``;
    None when nothing is padded (an all-real mask costs one host sync and keeps SDPA's fused kernels usable on GPU).

    Padded queries still attend to the real keys, so no row is empty and nothing turns NaN; their outputs are ignored
    by masked pooling and by the LLM blocks' own mask."""
    if tokens.mask is None or bool(tokens.mask.all()):
        return None
    bias = torch.zeros(tokens.mask.shape, dtype=tokens.x.dtype, device=tokens.x.device)
    return bias.masked_fill(~tokens.mask, float("-inf"))[:, None, None, :]


# ------------------------------------------------------------------------------------------------ soft masks
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
    explicit: bool = False,
) -> Any:
    """The attention mask the `attn_implementation` backend expects for `mode` (`None` when the module's
    `is_causal` flag alone expresses it, unless `explicit`). This is the ``pre_softmax`` implementation.

    Args:
        padding_mask: ``[B, N]`` bool, True = real token, or `None`.
        sliding_window: local attention span of the layer, or `None` for full attention.
        explicit: always build the mask tensor (layers that read it themselves, e.g. DeepSeek's sparse indexer).
        ratio: the soft-mask ratio ``r`` (mode ``soft`` only): the mask is the float ``log M`` of
            `soft_mask_matrix` (``[B, 1, N, N]``, the dtype's minimum where ``M = 0``), for eager, SDPA and flex.
    """
    check_mode(mode)
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
        allow_is_causal_skip=mode == "causal" and not explicit,
        allow_is_bidirectional_skip=mode == "bidirectional" and not explicit,
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
    check_mode(mode, causal_impl)
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
    explicit: bool = False,
) -> dict[str, Any]:
    """The attention keywords of one layer call: ``attention_mask`` (and, for ``post_softmax_mult``, the mask
    weights ``M`` ``[B, 1, N, N]`` (`soft_mask_matrix`) under ``POST_SOFTMAX_MULT_KWARG``)."""
    check_mode(mode, causal_impl)
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
            explicit=explicit,
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

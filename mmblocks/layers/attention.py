"""Self-attention under a mode (bidirectional, causal in two implementations, iLLaMA's soft mask) for blocks
written here (the causal ViT); `transformers` layers get their masks from `mmblocks.layers.masks` instead."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import check_mode, soft_mask_bias, soft_mask_weights, uses_post_softmax_mult

__all__ = ["masked_attention"]


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
            `mmblocks.layers.masks.padding_bias`, -inf at padded keys), or None.
        scale: score scale (default ``d ** -0.5``).
        dropout_p: attention dropout (training only; the caller passes 0 in eval).

    ``pre_softmax`` runs `F.scaled_dot_product_attention` (``is_causal`` when nothing is padded, else a float
    mask); ``post_softmax_mult`` computes ``(softmax(q k^T * scale + attn_mask) * M) @ v`` explicitly. Returns
    ``[B, H, N, d]``.
    """
    check_mode(mode, causal_impl)
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

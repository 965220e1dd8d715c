"""`perceiver`: Flamingo's perceiver resampler — a fixed number of learned latents read any number of tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_mm import Tokens

from .base import Adapter
from .projections import _init_linear
from .registry import register_adapter

__all__ = ["PerceiverAdapter", "PerceiverAttention"]


class PerceiverAttention(nn.Module):
    """Flamingo's resampler attention: latents attend to ``[inputs; latents]``.

    ``LayerNorm`` on the inputs and on the latents, bias-free q / kv / out projections, ``heads`` heads of
    ``dim_head``. Shape: ``x [B, N, dim]``, ``latents [B, L, dim]``, ``mask [B, N]`` (True = real) ->
    ``[B, L, dim]``. The latents are always valid keys, so a sample without real input tokens is still finite.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, num_latents = x.shape[0], latents.shape[1]
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        attn_mask = None
        if mask is not None:
            keep = torch.cat([mask, mask.new_ones(b, num_latents)], dim=1)
            attn_mask = keep[:, None, None, :]  # [B, 1, 1, N + L], True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class _FeedForward(nn.Sequential):
    """Flamingo's ``LayerNorm -> Linear -> GELU -> Linear`` (bias-free), ``mult x dim`` hidden."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
        )


@register_adapter("perceiver")
class PerceiverAdapter(Adapter):
    """Flamingo's perceiver resampler: ``num_latents`` learned latents, ``depth`` blocks of
    ``latents += attn(inputs, latents); latents += ff(latents)``, a final ``LayerNorm``, then ``Linear(dim, out_dim)``.

    Each block's cross-attention lets the latents attend to the concatenation of the inputs and the latents
    (Flamingo, Alayrac et al. 2022, and its open re-implementations), with pre-``LayerNorm``s on both and a
    pre-``LayerNorm`` feed-forward.

    Args:
        num_latents: output tokens (Flamingo: 64), independent of the input length.
        depth: resampler blocks (Flamingo: 6).
        heads / dim_head: attention heads and their width (8 x 64).
        ff_mult: feed-forward hidden width = ``ff_mult * dim`` (4).
        dim: working width of the latents (default ``in_dim``); other widths add ``Linear(in_dim, dim)`` on the
            inputs.
        max_frames: > 0 adds Flamingo's learned per-frame time embeddings to the grid tokens of 3D ``(T, H, W)``
            grids (``T <= max_frames``); 0 (default) adds none.
        drop_special: drop the prefix / suffix tokens (cls, registers) from the keys. Default False: the latents
            read every token.

    Mask: padded input tokens are never attended to, so padding never changes the output. The output has no
    padding (``mask=None``), a 1D ``grid (num_latents,)`` and ``pos=None`` (latents have no coordinates).

    Shape: `Tokens` or a tensor ``[B, N, in_dim]`` -> the same kind with ``[B, num_latents, out_dim]``.
    """

    changes_token_count = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_latents: int = 64,
        depth: int = 6,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        dim: int | None = None,
        max_frames: int = 0,
        drop_special: bool = False,
        init_std: float = 0.02,
    ):
        super().__init__()
        for name, value in (("num_latents", num_latents), ("depth", depth), ("heads", heads), ("dim_head", dim_head)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"perceiver {name} must be an int >= 1, got {value!r}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.num_latents, self.depth, self.drop_special = num_latents, depth, drop_special
        width = dim or in_dim
        self.dim = width
        self.proj_in = nn.Linear(in_dim, width) if width != in_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(num_latents, width))
        self.max_frames = max_frames
        self.frame_embed = nn.Parameter(torch.zeros(max_frames, width)) if max_frames > 0 else None
        if self.frame_embed is not None:
            nn.init.normal_(self.frame_embed, std=init_std)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, heads, dim_head), _FeedForward(width, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)
        for m in (self.proj_in, self.proj):
            if isinstance(m, nn.Linear):
                _init_linear(m, init_std)

    def num_output_tokens(self, input_tokens: int | Tokens) -> int:
        return self.num_latents

    def _inputs(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, mask = tokens.x, tokens.mask
        if mask is not None:  # padding may hold anything (inf / nan): zero it before it meets a matmul
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        x = self.proj_in(x)
        if self.frame_embed is not None and tokens.grid is not None and len(tokens.grid) == 3:
            t, h, w = tokens.grid
            if t > self.max_frames:
                raise ValueError(f"perceiver max_frames={self.max_frames}, got a grid of {t} frames {tokens.grid}")
            time = self.frame_embed[:t].repeat_interleave(h * w, dim=0)
            pad = (tokens.num_prefix, tokens.num_suffix)
            x = x + F.pad(time, (0, 0, *pad)).to(x.dtype)
        if self.drop_special and (tokens.num_prefix or tokens.num_suffix):
            sl = slice(tokens.num_prefix, tokens.num_tokens - tokens.num_suffix)
            x, mask = x[:, sl], mask[:, sl] if mask is not None else None
        return x, mask

    def forward(self, tokens: Tokens | torch.Tensor) -> Tokens | torch.Tensor:
        is_tokens = isinstance(tokens, Tokens)
        self._check(tokens.x if is_tokens else tokens)
        if not is_tokens:
            tokens = Tokens(x=tokens)
        x, mask = self._inputs(tokens)
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents, mask)
            latents = latents + ff(latents)
        y = self.proj(self.norm(latents))
        if not is_tokens:
            return y
        return Tokens(x=y, grid=(self.num_latents,), modality=tokens.modality)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_latents={self.num_latents}, depth={self.depth}"

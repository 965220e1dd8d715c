"""`ContrastiveHead`: the two projections of a CLIP-style model on top of an encoder's `Tokens` and a text tower.

The encoder side pools the final tokens (`ClassifierHead`'s poolings) and projects them to the joint embedding
(``[B, N, D] -> [B, E]``); the text side runs the text tower (anything with ``tokenize``, ``width`` and
``forward(ids [N, L]) -> [N, width]``: `mmblocks.models.text_towers`) and projects its pooled features
(``[N, width] -> [N, E]``). ``forward`` returns what open_clip's ``CLIP.forward`` returns: L2-normalised
``image_features`` and ``text_features``, ``logit_scale`` already exponentiated (and ``logit_bias`` for SigLIP), so
open_clip's ``ClipLoss`` / ``SigLipLoss`` take it as is. The name ``image_features`` is open_clip's, for any modality.

Text features may come precomputed (``text_embeds``: the tower's output, e.g. cached once by a task whose tower is
locked, LiT), and then the tower does not run.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from tokenizers_mm import Tokens

from .classification import POOLING, Pooling, pool_tokens
from .registry import register_head

__all__ = ["CONTRASTIVE_PROJECTIONS", "ContrastiveHead"]

CONTRASTIVE_PROJECTIONS: tuple[str, ...] = ("linear", "mlp", "none")


def _projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "none":
        if in_dim != out_dim:
            raise ValueError(f"projection 'none' needs equal widths, got {in_dim} -> {out_dim}: use 'linear'")
        return nn.Identity()
    if kind == "linear":  # bias-free, as CLIP's projections
        layer = nn.Linear(in_dim, out_dim, bias=False)
        trunc_normal_(layer.weight, std=in_dim**-0.5)
        return layer
    if kind == "mlp":  # open_clip's HF text towers' "mlp" projection
        hidden = (in_dim + out_dim) // 2
        return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_dim, bias=False))
    raise ValueError(f"projection must be one of {CONTRASTIVE_PROJECTIONS}, got {kind!r}")


@register_head("contrastive")
class ContrastiveHead(nn.Module):
    """Pool + project the encoder's tokens, project the text tower's features, and hold the logit scale (and bias).

    Args:
        in_dim: width D of the encoder's final tokens.
        text_tower: the text tower module (``tokenize``, ``width``, ``forward(ids) -> [N, width]``); a locked one
            (``tune == "frozen"``) keeps no gradients and stays in eval mode.
        embed_dim: width E of the joint embedding (default: the text tower's width).
        pool: how the encoder's tokens are pooled (`POOLING`).
        proj, text_proj: ``linear`` (bias-free), ``mlp`` or ``none`` (identity: equal widths only; LiT's image side
            maps straight into a locked tower's space with ``text_proj: none``).
        init_logit_scale: the initial temperature, as the log of the scale (CLIP: log(1/0.07); SigLIP: log 10).
        init_logit_bias: the initial logit bias (SigLIP: -10); None: no bias (CLIP).
        max_logit_scale: the exponentiated scale is clamped to this (open_clip clamps at 100).
    """

    def __init__(
        self,
        in_dim: int,
        text_tower: nn.Module,
        embed_dim: int | None = None,
        pool: Pooling = "cls",
        proj: Literal["linear", "mlp", "none"] = "linear",
        text_proj: Literal["linear", "mlp", "none"] = "linear",
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        if not isinstance(text_tower, nn.Module) or not hasattr(text_tower, "tokenize"):
            raise ValueError(
                "a contrastive head needs a text tower module (model.text_tower: {name: minilm | open_clip | "
                f"llm_blocks, ...}}), got {type(text_tower).__name__}"
            )
        if pool not in POOLING:
            raise ValueError(f"pool must be one of {POOLING}, got {pool!r}")
        width = int(text_tower.width)
        embed_dim = int(embed_dim or width)
        self.in_dim, self.embed_dim, self.pool = in_dim, embed_dim, pool
        self.text_tower = text_tower
        pooled = in_dim * (2 if pool == "cls+max" else 1)
        self.proj = _projection(proj, pooled, embed_dim)
        self.text_proj = _projection(text_proj, width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.max_log_scale = math.log(max_logit_scale)

    @property
    def text_locked(self) -> bool:
        """Whether the text tower is frozen (its outputs can be cached)."""
        return getattr(self.text_tower, "tune", "full") == "frozen"

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Strings -> the text tower's token ids ``[N, L]``."""
        return self.text_tower.tokenize(texts)

    def pool_tokens(self, tokens: Tokens) -> torch.Tensor:
        return pool_tokens(tokens, self.pool)

    def encode_tokens(self, tokens: Tokens, normalize: bool = False) -> torch.Tensor:
        """The encoder's final tokens ``[B, N, D]`` -> joint embeddings ``[B, E]``."""
        if tokens.dim != self.in_dim:
            raise ValueError(f"ContrastiveHead expects width {self.in_dim}, got {tokens.dim}")
        features = self.proj(self.pool_tokens(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def text_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, L]`` -> the text tower's pooled features ``[N, width]`` (before the projection)."""
        if self.text_locked:
            with torch.no_grad():
                return self.text_tower(ids)
        return self.text_tower(ids)

    def project_text(self, embeds: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The tower's features ``[N, width]`` -> joint embeddings ``[N, E]``."""
        features = self.text_proj(embeds.to(self.logit_scale.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids ``[N, L]`` -> joint embeddings ``[N, E]``."""
        return self.project_text(self.text_embeds(ids), normalize)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at `max_logit_scale`."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(
        self, tokens: Tokens, text: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``image_features [B, E]`` (normalised), ``text_features [N, E]`` (normalised; when `text` ids ``[N, L]``
        or the tower's `text_embeds` ``[N, width]`` are given), ``logit_scale`` (exponentiated) and, with a bias,
        ``logit_bias``: open_clip's ``CLIP.forward`` output."""
        if text is not None and text_embeds is not None:
            raise ValueError("give text ids or precomputed text_embeds, not both")
        out: dict[str, Any] = {"image_features": self.encode_tokens(tokens, normalize=True)}
        if text is not None:
            out["text_features"] = self.encode_text(text, normalize=True)
        elif text_embeds is not None:
            out["text_features"] = self.project_text(text_embeds, normalize=True)
        out["logit_scale"] = self.scale()
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, embed_dim={self.embed_dim}, pool={self.pool!r}"

"""`Backbone`: what `MMEncoder` needs from the transformer between the tokenizer and the head.

Every backbone (`TimmViT`, `PointTransformer`, `CausalViT`) derives from `BackboneBase`, which gives the defaults, so
the encoder calls the same members on all of them instead of probing for capabilities:

* ``blocks`` (each ``block(x [B, N, D], attn_mask=None) -> [B, N, D]``, ``attn_mask`` an additive key-padding bias),
  ``norm_pre`` (before the first block) and ``norm`` (after the last one, and after the LLM stage);
* ``embed_dim`` (``D``) and ``readout`` (the `ClassifierHead` pooling that reads this backbone's summary token:
  ``cls``, or ``last`` for a cls-last causal ViT);
* ``prepare(tokens)`` (called once per forward before the blocks: e.g. a causal ViT's 2-D rotary grid) and
  ``block_positions(tokens)`` (positions added before *every* block, Point-BERT style; None for most);
* ``make_tokenizer(**kwargs)`` (the backbone's own tokenizer: a ViT's patch embedding, AST's spectrogram patches, ...)
  and ``tokenizer_kwargs()`` (what another tokenizer needs to feed these blocks, e.g. ``embed_dim``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from tokenizers_mm import Tokens

from ..layers.masks import padding_bias

__all__ = ["Backbone", "BackboneBase", "check_backbone"]


@runtime_checkable
class Backbone(Protocol):
    embed_dim: int
    blocks: nn.ModuleList
    norm_pre: nn.Module
    norm: nn.Module
    readout: str

    def prepare(self, tokens: Tokens) -> None: ...

    def block_positions(self, tokens: Tokens) -> torch.Tensor | None: ...

    def make_tokenizer(self, **kwargs: Any) -> nn.Module: ...

    def tokenizer_kwargs(self) -> dict[str, Any]: ...


_MEMBERS = (
    "embed_dim",
    "blocks",
    "norm_pre",
    "norm",
    "readout",
    "prepare",
    "block_positions",
    "make_tokenizer",
    "tokenizer_kwargs",
)


def check_backbone(module: Any) -> None:
    """A clear error when `module` lacks a member of the `Backbone` protocol."""
    missing = [m for m in _MEMBERS if not hasattr(module, m)]
    if missing:
        raise TypeError(
            f"{type(module).__name__} is not a Backbone: it lacks {missing} (derive it from "
            "mmblocks.models.BackboneBase, which provides the defaults)"
        )


class BackboneBase(nn.Module):
    """Defaults of the `Backbone` protocol: no pre-norm, cls readout, nothing to prepare, no per-block positions, no
    tokenizer of its own, and ``embed_dim`` as what another tokenizer needs. Subclasses set ``embed_dim``,
    ``blocks`` and ``norm`` (and override what differs)."""

    readout: str = "cls"

    def __init__(self) -> None:
        super().__init__()
        self.norm_pre: nn.Module = nn.Identity()

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def prepare(self, tokens: Tokens) -> None:
        """Called once per forward with the tokenizer's output, before the blocks run."""

    def block_positions(self, tokens: Tokens) -> torch.Tensor | None:
        """Positions ``[B, N, D]`` added before every block (None: none)."""
        return None

    def make_tokenizer(self, **kwargs: Any) -> nn.Module:
        raise ValueError(f"{type(self).__name__} has no tokenizer of its own: name one in model.tokenizer")

    def tokenizer_kwargs(self) -> dict[str, Any]:
        """Constructor arguments another tokenizer needs to feed these blocks."""
        return {"embed_dim": self.embed_dim}

    def forward(self, tokens: Tokens) -> Tokens:
        """All blocks, no final norm: ``Tokens [B, N, D] -> Tokens [B, N, D]`` (padded keys masked)."""
        self.prepare(tokens)
        pos = self.block_positions(tokens)
        x = self.norm_pre(tokens.x)
        attn_mask = padding_bias(tokens)
        for blk in self.blocks:
            x = blk(x if pos is None else x + pos, attn_mask=attn_mask)
        return tokens.with_x(x)

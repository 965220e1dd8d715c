"""`Tokens`: the one container that flows between every mmblocks stage (design §2)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["Tokens"]


@dataclass
class Tokens:
    """A batch of token embeddings plus the metadata every stage relies on.

    Fields:
        x: ``[B, N, D]`` token embeddings.
        mask: ``[B, N]`` bool, True = real token; ``None`` means every token is real.
        pos: ``[B, N, P]`` float coordinates per token (``(row, col)`` for images, ``(t, row, col)`` for
            video, ``(x, y, z)`` for point groups, ``(t,)`` for audio frames) or ``None``.
        grid: the regular grid formed by the non-special tokens, e.g. ``(14, 14)``; ``None`` if irregular.
        num_prefix / num_suffix: special tokens (cls, registers) before / after the grid tokens.
        modality: ``"image"``, ``"points"``, ``"audio"``, ``"video"``, ``"motion"``, ``"text"``, ...
    """

    x: torch.Tensor
    mask: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    grid: tuple[int, ...] | None = None
    num_prefix: int = 0
    num_suffix: int = 0
    modality: str = "unknown"

    def __post_init__(self) -> None:
        if self.grid is not None:
            self.grid = tuple(int(g) for g in self.grid)
        # Leaves may be placeholders (None, FakeTensor-free sentinels) while torch.compile or
        # pytree utilities rebuild the container; only validate real tensors.
        if isinstance(self.x, torch.Tensor):
            self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        x = self.x
        if x.dim() != 3:
            raise ValueError(f"Tokens.x must be [B, N, D], got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
        b, n, _ = x.shape
        if self.mask is not None:
            m = self.mask
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"Tokens.mask must be a bool tensor [B, N] or None, got {type(m).__name__}")
            if m.dtype != torch.bool:
                raise TypeError(f"Tokens.mask must have dtype torch.bool (True = real token), got {m.dtype}")
            if tuple(m.shape) != (b, n):
                raise ValueError(
                    f"Tokens.mask must be [B, N] = [{b}, {n}] to match x {tuple(x.shape)}, got {tuple(m.shape)}"
                )
        if self.pos is not None:
            p = self.pos
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"Tokens.pos must be a float tensor [B, N, P] or None, got {type(p).__name__}")
            if p.dim() != 3 or p.shape[0] != b or p.shape[1] != n:
                raise ValueError(
                    f"Tokens.pos must be [B, N, P] with B={b}, N={n} to match x {tuple(x.shape)}, got {tuple(p.shape)}"
                )
            if not p.is_floating_point():
                raise TypeError(f"Tokens.pos must be a floating-point tensor, got {p.dtype}")
        if self.num_prefix < 0 or self.num_suffix < 0:
            raise ValueError(f"num_prefix and num_suffix must be >= 0, got {self.num_prefix} and {self.num_suffix}")
        if self.num_prefix + self.num_suffix > n:
            raise ValueError(
                f"num_prefix ({self.num_prefix}) + num_suffix ({self.num_suffix}) exceeds the token count N={n}"
            )
        if self.grid is not None:
            if any(g <= 0 for g in self.grid):
                raise ValueError(f"Tokens.grid sizes must be positive, got {self.grid}")
            expected = n - self.num_prefix - self.num_suffix
            if math.prod(self.grid) != expected:
                raise ValueError(
                    f"Tokens.grid {self.grid} holds {math.prod(self.grid)} tokens, but x has N={n} tokens with "
                    f"num_prefix={self.num_prefix} and num_suffix={self.num_suffix}, i.e. {expected} grid tokens"
                )

    # ------------------------------------------------------------------ shape helpers
    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    @property
    def dim(self) -> int:
        return self.x.shape[2]

    @property
    def num_grid_tokens(self) -> int:
        return self.num_tokens - self.num_prefix - self.num_suffix

    def _grid_slice(self) -> slice:
        return slice(self.num_prefix, self.num_tokens - self.num_suffix)

    # ------------------------------------------------------------------ methods every stage relies on
    def grid_tokens(self) -> torch.Tensor:
        """The non-special tokens ``[B, N - num_prefix - num_suffix, D]`` (row-major over ``grid``)."""
        return self.x[:, self._grid_slice()]

    def grid_mask(self) -> torch.Tensor | None:
        """The padding mask of the grid tokens ``[B, N - num_prefix - num_suffix]`` (True = real), or None."""
        return None if self.mask is None else self.mask[:, self._grid_slice()]

    def prefix_tokens(self) -> torch.Tensor:
        """The special tokens before the grid, ``[B, num_prefix, D]``."""
        return self.x[:, : self.num_prefix]

    def suffix_tokens(self) -> torch.Tensor:
        """The special tokens after the grid, ``[B, num_suffix, D]``."""
        return self.x[:, self.num_tokens - self.num_suffix :]

    def with_x(self, x: torch.Tensor) -> Tokens:
        """Same metadata, new embeddings ``x`` ``[B, N, D']`` (the width may change, B and N may not)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"with_x expects a [B, N, D] tensor, got {getattr(x, 'shape', type(x))}")
        if x.shape[:2] != self.x.shape[:2]:
            raise ValueError(
                f"with_x keeps B and N: expected [{self.batch_size}, {self.num_tokens}, D], got {tuple(x.shape)}; "
                "stages that change the token count must build new mask/pos/grid"
            )
        return dataclasses.replace(self, x=x)

    def to(self, *args: Any, **kwargs: Any) -> Tokens:
        """Like ``Tensor.to``: a device moves every tensor, a dtype converts only the float fields (``x``, ``pos``)."""
        x = self.x.to(*args, **kwargs)
        pos = self.pos.to(*args, **kwargs) if self.pos is not None else None
        mask = self.mask.to(device=x.device) if self.mask is not None else None
        return dataclasses.replace(self, x=x, pos=pos, mask=mask)


def _flatten(t: Tokens) -> tuple[list[Any], Any]:
    return [t.x, t.mask, t.pos], (t.grid, t.num_prefix, t.num_suffix, t.modality)


def _unflatten(children: Any, context: Any) -> Tokens:
    x, mask, pos = children
    grid, num_prefix, num_suffix, modality = context
    return Tokens(x=x, mask=mask, pos=pos, grid=grid, num_prefix=num_prefix, num_suffix=num_suffix, modality=modality)


def _flatten_with_keys(t: Tokens) -> tuple[list[tuple[Any, Any]], Any]:
    children, context = _flatten(t)
    keys = [pytree.GetAttrKey(name) for name in ("x", "mask", "pos")]
    return list(zip(keys, children)), context


pytree.register_pytree_node(
    Tokens,
    _flatten,
    _unflatten,
    serialized_type_name="tokenizers_mm.Tokens",
    flatten_with_keys_fn=_flatten_with_keys,
)

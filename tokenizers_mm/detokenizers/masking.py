"""MAE random masking of grid tokens: which tokens an encoder sees, and how a decoder puts them back in place.

`random_masking` draws the same masks as MAE and HF ``ViTMAEEmbeddings.random_masking`` (argsort of per-sample noise;
the first ``int(L * (1 - mask_ratio))`` in noise order are kept), so one ``noise`` tensor reproduces a ViTMAE run.
`keep_tokens` applies a mask to `Tokens` (special tokens always stay), and a decoder unshuffles with ``ids_restore``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokens import Tokens

__all__ = ["RandomMask", "keep_tokens", "random_masking"]


@dataclass(frozen=True)
class RandomMask:
    """One draw of MAE masking over ``L`` grid tokens.

    Attributes:
        ids_keep: ``[B, K]`` long, the visible grid tokens in noise order (``K = int(L * (1 - mask_ratio))``).
        ids_restore: ``[B, L]`` long, the permutation that puts ``[visible..., mask tokens...]`` back in grid order.
        mask: ``[B, L]`` float, 1 = hidden (the loss is taken there), 0 = visible (HF's convention).
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def num_keep(self) -> int:
        return int(self.ids_keep.shape[1])

    @property
    def hidden(self) -> torch.Tensor:
        """``[B, L]`` bool, True = hidden."""
        return self.mask.bool()


def random_masking(
    batch: int,
    length: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> RandomMask:
    """Hide ``mask_ratio`` of ``length`` grid tokens per sample (per-sample shuffle by argsort of uniform noise).

    ``noise [B, L]`` fixes the draw (as HF's ``noise=``); otherwise it is drawn with ``generator``.
    """
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1) (at least one token stays visible), got {mask_ratio}")
    if batch < 1 or length < 1:
        raise ValueError(f"random_masking needs batch >= 1 and length >= 1, got batch={batch}, length={length}")
    if noise is None:
        noise = torch.rand(batch, length, generator=generator, device=device)
    elif tuple(noise.shape) != (batch, length):
        raise ValueError(f"noise must be [B, L] = [{batch}, {length}], got {tuple(noise.shape)}")
    keep = int(length * (1 - float(mask_ratio)))
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no token of {length}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return RandomMask(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)


def keep_tokens(tokens: Tokens, ids_keep: torch.Tensor) -> Tokens:
    """The visible part of ``tokens``: its special (prefix / suffix) tokens and the grid tokens ``ids_keep [B, K]``
    (indices into the grid tokens, in the order given). ``pos`` and ``mask`` follow; ``grid`` becomes ``None`` (the
    kept tokens no longer fill a regular grid)."""
    n = tokens.num_grid_tokens
    if ids_keep.dim() != 2 or ids_keep.shape[0] != tokens.batch_size:
        raise ValueError(f"ids_keep must be [B, K] with B={tokens.batch_size}, got {tuple(ids_keep.shape)}")
    if ids_keep.numel() and (int(ids_keep.min()) < 0 or int(ids_keep.max()) >= n):
        raise ValueError(
            f"ids_keep indexes {n} grid tokens, got values in [{int(ids_keep.min())}, {int(ids_keep.max())}]"
        )
    p, s = tokens.num_prefix, tokens.num_suffix

    def take(t: torch.Tensor) -> torch.Tensor:
        grid = t[:, p : t.shape[1] - s]
        index = ids_keep.to(t.device).reshape(*ids_keep.shape, *([1] * (t.dim() - 2)))
        kept = torch.gather(grid, 1, index.expand(-1, -1, *t.shape[2:]))
        return torch.cat([t[:, :p], kept, t[:, t.shape[1] - s :]], dim=1)

    return Tokens(
        x=take(tokens.x),
        mask=None if tokens.mask is None else take(tokens.mask),
        pos=None if tokens.pos is None else take(tokens.pos),
        grid=None,
        num_prefix=p,
        num_suffix=s,
        modality=tokens.modality,
    )

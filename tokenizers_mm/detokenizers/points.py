"""Point groups back to points: the Point-MAE decoder (Pang et al. 2022) and the Chamfer distance it trains with.

The MAE-style pipeline this file closes::

    groups, centers, _ = group_points(points, G, K)          # tokenizers_mm.points: [B, G, K, 3], [B, G, 3]
    masked = random_group_mask(B, G, 0.6)                    # [B, G] bool, True = hidden from the encoder
    visible = select_visible(tokenizer(points), masked)      # Tokens of the visible groups (cls kept)
    tokens = encoder(visible)                                # any Tokens -> Tokens stage
    pred = decoder(tokens, centers, masked)                  # [B, G, K, 3] local points of every group
    loss = decoder.loss(pred, groups[..., :3], masked)       # Chamfer over the hidden groups only
    cloud = decoder.render(pred, centers)                    # [B, G * K, 3] absolute points

`PointDecoder` (registered as the ``points`` detokenizer) follows Point-MAE's decoder: a learned mask token for every
hidden group, the centre-MLP position embedding of *all* groups added again at every block input
(``x = block(x + pos)``), timm ViT blocks, a final LayerNorm and a head. The head is Point-MAE's linear prediction
(``D -> K * 3``) or a FoldingNet folding (a fixed 2-D grid of ``K`` points, concatenated to the token and folded
twice by MLPs into 3-D).

`chamfer_distance` is plain torch in Point-MAE's two conventions (``ChamferDistanceL2`` / ``ChamferDistanceL1`` of
its CUDA extension), with padding masks: the nearest neighbours are found without autograd, blockwise (never more
than ``_BLOCK_ELEMENTS`` distances at once), and the distances to them are recomputed with autograd, so the gradient
is the one the CUDA kernel returns (through the nearest neighbour) and memory stays bounded.
"""

from __future__ import annotations

import math
from typing import Literal, get_args, overload

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ..registry import register_detokenizer
from ..tokens import Tokens
from .pixels import init_xavier

__all__ = [
    "CHAMFER_CONVENTIONS",
    "DECODER_HEADS",
    "PREFIX_MODES",
    "ChamferConvention",
    "DecoderHead",
    "PointDecoder",
    "PrefixMode",
    "chamfer_distance",
    "folding_grid",
    "random_group_mask",
    "select_visible",
]

ChamferConvention = Literal["l2", "l1"]
CHAMFER_CONVENTIONS: tuple[str, ...] = get_args(ChamferConvention)
Reduction = Literal["mean", "none"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
DecoderHead = Literal["linear", "folding"]
DECODER_HEADS: tuple[str, ...] = get_args(DecoderHead)
PrefixMode = Literal["keep", "drop"]
PREFIX_MODES: tuple[str, ...] = get_args(PrefixMode)

_BLOCK_ELEMENTS = 1 << 22  # most pairwise distances held at once by the nearest-neighbour search


# ---------------------------------------------------------------------------------------------------- Chamfer


def _check_cloud(x: torch.Tensor, name: str, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {layout}, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def _check_mask(mask: torch.Tensor | None, name: str, shape: tuple[int, int], device: torch.device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape {list(shape)} (True = real point), got {got}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, the points on {device}")
    empty = (~mask.any(1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"{name}: cloud(s) {empty.tolist()} have no real points; Chamfer needs at least one per cloud")


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[..., n, 3] x [..., m, 3] -> [..., n, m]`` squared distances ``((dx^2 + dy^2) + dz^2)``, exact in the dtype
    (no ``|a|^2 + |b|^2 - 2ab`` cancellation)."""
    d = (a[..., :, None, 0] - b[..., None, :, 0]).square_()
    d += (a[..., :, None, 1] - b[..., None, :, 1]).square_()
    d += (a[..., :, None, 2] - b[..., None, :, 2]).square_()
    return d


@torch.no_grad()
def _nearest(
    a: torch.Tensor, b: torch.Tensor, a_mask: torch.Tensor | None, b_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of each point's nearest real point in the other cloud: ``([B, M] into P, [B, P] into M)``.

    Blocks of clouds and of rows of `a`, so at most about `_BLOCK_ELEMENTS` distances exist at once; of equally near
    points the first is taken."""
    bsz, m, _ = a.shape
    p = b.shape[1]
    rows = max(1, min(m, _BLOCK_ELEMENTS // max(p, 1)))
    clouds = max(1, _BLOCK_ELEMENTS // (rows * max(p, 1)))
    idx_ab = torch.empty(bsz, m, dtype=torch.long, device=a.device)
    idx_ba = torch.empty(bsz, p, dtype=torch.long, device=a.device)
    inf = float("inf")
    for c0 in range(0, bsz, clouds):
        c1 = min(c0 + clouds, bsz)
        best = torch.full((c1 - c0, p), inf, dtype=a.dtype, device=a.device)
        best_idx = torch.zeros(c1 - c0, p, dtype=torch.long, device=a.device)
        for r0 in range(0, m, rows):
            r1 = min(r0 + rows, m)
            d = _sq_dist(a[c0:c1, r0:r1], b[c0:c1])  # [c, r, P]
            if b_mask is not None:
                d.masked_fill_(~b_mask[c0:c1, None, :], inf)
            idx_ab[c0:c1, r0:r1] = d.argmin(2)
            if a_mask is not None:
                d.masked_fill_(~a_mask[c0:c1, r0:r1, None], inf)
            val, arg = d.min(1)  # [c, P]: the nearest of these rows
            closer = val < best  # strict: an earlier block keeps its tie
            best = torch.where(closer, val, best)
            best_idx = torch.where(closer, arg + r0, best_idx)
        idx_ba[c0:c1] = best_idx
    return idx_ab, idx_ba


def _matched(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, convention: str) -> torch.Tensor:
    """Per point of `a`, its distance to ``b[idx]`` (squared for ``l2``, Euclidean for ``l1``), with autograd."""
    diff = a - b.gather(1, idx[..., None].expand(-1, -1, 3))
    if convention == "l1":
        return torch.linalg.vector_norm(diff, dim=-1)  # its gradient at a zero distance is 0, not NaN as sqrt's
    return (diff[..., 0].square() + diff[..., 1].square()) + diff[..., 2].square()


def _masked_mean(d: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return d.mean(1)
    return torch.where(mask, d, 0).sum(1) / mask.sum(1)


def chamfer_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    pred_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    convention: ChamferConvention = "l2",
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Chamfer distance between point clouds in Point-MAE's conventions.

    With ``d1`` the squared distance of each predicted point to its nearest target point and ``d2`` that of each
    target point to its nearest predicted point:

    - ``"l2"`` (Point-MAE ``ChamferDistanceL2``, ``cdl2``): ``mean(d1) + mean(d2)``;
    - ``"l1"`` (``ChamferDistanceL1``, ``cdl1``): ``(mean(sqrt d1) + mean(sqrt d2)) / 2``.

    Means are over the real points of each cloud; padded points (mask False) are never matched, never averaged and
    get no gradient, whatever values they hold. Point-MAE averages over all points of the batch at once, which is
    the same as ``reduction="mean"`` when every cloud has the same number of real points.

    Args:
        pred: ``[B, M, 3]`` predicted points; target: ``[B, P, 3]`` (M and P may differ). Float; mixed float dtypes
            are promoted (float64 stays float64).
        pred_mask: ``[B, M]`` bool, True = real point (None: all real); target_mask: ``[B, P]`` likewise.
        convention: ``"l2"`` or ``"l1"``.
        reduction: ``"mean"`` -> a scalar (mean over the batch); ``"none"`` -> ``[B]`` per cloud.
    Returns the distance, differentiable in `pred` and `target` (through the nearest neighbours, as the CUDA
    kernels of Point-MAE; an ``l1`` term at distance exactly 0 gets gradient 0).
    Raises:
        ValueError: wrong shapes, masks, batch sizes or devices, a cloud without real points, non-finite real
            coordinates, an unknown convention or reduction. TypeError: non-float points.
    """
    _check_cloud(pred, "pred", "[B, M, 3]")
    _check_cloud(target, "target", "[B, P, 3]")
    if convention not in CHAMFER_CONVENTIONS:
        raise ValueError(f"convention must be one of {CHAMFER_CONVENTIONS}, got {convention!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    bsz, m, _ = pred.shape
    p = target.shape[1]
    if target.shape[0] != bsz:
        raise ValueError(f"pred has batch {bsz} but target has batch {target.shape[0]}")
    if target.device != pred.device:
        raise ValueError(f"pred is on {pred.device} but target on {target.device}")
    if m == 0 or p == 0:
        raise ValueError(
            f"every cloud needs at least one point, got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
        )
    _check_mask(pred_mask, "pred_mask", (bsz, m), pred.device)
    _check_mask(target_mask, "target_mask", (bsz, p), pred.device)
    dtype = torch.promote_types(pred.dtype, target.dtype)
    pred, target = pred.to(dtype), target.to(dtype)
    # padded points become the origin: nothing they held (NaN included) reaches the result or the gradient
    if pred_mask is not None:
        pred = torch.where(pred_mask[..., None], pred, 0)
    if target_mask is not None:
        target = torch.where(target_mask[..., None], target, 0)
    if not torch.compiler.is_compiling():
        for name, x in (("pred", pred), ("target", target)):
            bad = int((~torch.isfinite(x)).any(-1).sum())
            if bad:
                raise ValueError(f"{name} holds {bad} real point(s) with NaN or infinite coordinates")
    idx1, idx2 = _nearest(pred, target, pred_mask, target_mask)
    d1 = _masked_mean(_matched(pred, target, idx1, convention), pred_mask)
    d2 = _masked_mean(_matched(target, pred, idx2, convention), target_mask)
    dist = d1 + d2 if convention == "l2" else (d1 + d2) / 2
    return dist.mean() if reduction == "mean" else dist


# ---------------------------------------------------------------------------------------------------- masking


def random_group_mask(
    batch: int,
    num_groups: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Point-MAE's ``rand`` masking: ``[B, G]`` bool, True = the group is hidden from the encoder.

    Every cloud hides exactly ``round(mask_ratio * num_groups)`` groups (Python's `round`; Point-MAE truncates with
    ``int``, the same for its 0.6 x 64), chosen uniformly at random and independently per cloud. The draw is made
    on the `generator`'s device (CPU without one) and moved to `device`, so a seeded generator gives the same mask
    on every device.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if not 0.0 <= float(mask_ratio) <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    hidden = round(float(mask_ratio) * num_groups)
    draw_on = generator.device if generator is not None else torch.device("cpu")
    order = torch.rand(batch, num_groups, generator=generator, device=draw_on).argsort(1)
    masked = torch.zeros(batch, num_groups, dtype=torch.bool, device=draw_on)
    masked.scatter_(1, order[:, :hidden], True)
    return masked.to(device) if device is not None else masked


def _check_masked(masked: torch.Tensor, batch: int, num_groups: int, name: str = "masked") -> int:
    """Validate ``masked [B, G]``; return the number of visible groups (the same in every cloud)."""
    if not isinstance(masked, torch.Tensor) or masked.dtype != torch.bool or masked.dim() != 2:
        got = f"{masked.dtype} {tuple(masked.shape)}" if isinstance(masked, torch.Tensor) else type(masked).__name__
        raise ValueError(f"{name} must be a bool [B, G] tensor (True = hidden group), got {got}")
    if tuple(masked.shape) != (batch, num_groups):
        raise ValueError(f"{name} must be [B, G] = [{batch}, {num_groups}], got {tuple(masked.shape)}")
    visible = (~masked).sum(1)
    if bool((visible != visible[0]).any()):
        raise ValueError(
            f"every cloud must hide the same number of groups (visible per cloud: {visible.tolist()}); "
            "use random_group_mask"
        )
    return int(visible[0])


@overload
def select_visible(x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor: ...
@overload
def select_visible(x: Tokens, masked: torch.Tensor) -> Tokens: ...
def select_visible(x: torch.Tensor | Tokens, masked: torch.Tensor) -> torch.Tensor | Tokens:
    """The visible groups, in group order: ``[B, G, *] -> [B, G_vis, *]`` (every cloud hides as many groups).

    Given `Tokens` (e.g. a `PointGroups` output, ``[B, P + G + S, D]``), the grid tokens are selected (with their
    ``pos`` and ``mask``) and the prefix / suffix tokens kept; the result has no ``grid``.
    """
    if isinstance(x, Tokens):
        start, stop = x.num_prefix, x.num_tokens - x.num_suffix

        def pick(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[:, :start], select_visible(t[:, start:stop], masked), t[:, stop:]], dim=1)

        return Tokens(
            x=pick(x.x),
            mask=pick(x.mask) if x.mask is not None else None,
            pos=pick(x.pos) if x.pos is not None else None,
            grid=None,
            num_prefix=x.num_prefix,
            num_suffix=x.num_suffix,
            modality=x.modality,
        )
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a [B, G, ...] tensor or Tokens, got {getattr(x, 'shape', type(x))}")
    vis = _check_masked(masked, x.shape[0], x.shape[1])
    if masked.device != x.device:
        raise ValueError(f"masked is on {masked.device}, x on {x.device}")
    return x[~masked].reshape(x.shape[0], vis, *x.shape[2:])


# ---------------------------------------------------------------------------------------------------- decoder


def folding_grid(n: int) -> torch.Tensor:
    """FoldingNet's fixed 2-D grid of `n` points ``[n, 2]``: an ``r x c`` lattice over ``[-1, 1]^2`` with
    ``r * c = n`` and ``r`` the largest divisor of `n` not above ``sqrt(n)`` (4 x 8 for 32, 1 x n for a prime)."""
    if n < 1:
        raise ValueError(f"a folding grid needs n >= 1 points, got {n}")
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    c = n // r
    ys = torch.linspace(-1.0, 1.0, r) if r > 1 else torch.zeros(1)
    xs = torch.linspace(-1.0, 1.0, c) if c > 1 else torch.zeros(1)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(n, 2)


class _Folding(nn.Module):
    """FoldingNet head: ``[N, D] -> [N, K, 3]``. Fold 1 maps ``concat(token, grid point)`` through an MLP to 3-D; fold
    2 maps ``concat(token, fold-1 point)`` to the final point. The token part of each first layer is computed once
    per token (a split of the same weight: equal to the concatenation, without the ``[N, K, D]`` copy)."""

    def __init__(self, dim: int, group_size: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("grid", folding_grid(group_size), persistent=False)
        self.fold1 = nn.ModuleList([nn.Linear(dim + 2, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 3)])
        self.fold2 = nn.ModuleList([nn.Linear(dim + 3, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 3)])

    def _fold(self, layers: nn.ModuleList, x: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        first = layers[0]
        h = F.linear(x, first.weight[:, : self.dim], first.bias)[:, None]  # [N, 1, H]
        h = F.gelu(h + F.linear(pts, first.weight[:, self.dim :]))  # [N, K, H]
        return layers[2](F.gelu(layers[1](h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(x.dtype).expand(x.shape[0], -1, -1)
        return self._fold(self.fold2, x, self._fold(self.fold1, x, grid))


@register_detokenizer("points")
class PointDecoder(nn.Module):
    """Point-MAE's decoder: tokens of the visible groups + all group centres -> local points of every group.

    The sequence it runs is every group in group order (the encoder's token where the group was visible, the
    learned ``mask_token`` where it was hidden), with ``pos = MLP(centre)`` of every group added before every
    block: ``x_{i+1} = block_i(x_i + pos)``; then LayerNorm and the head. Attention is permutation-equivariant, so
    this equals Point-MAE's ``[visible tokens, mask tokens]`` order with the matching positions.

    Prefix / suffix tokens of the incoming `Tokens` (a cls token, registers): ``prefix="keep"`` (default, as MAE's
    decoder keeps the cls token) keeps them as context, with one learned decoder position ``context_pos``, and drops
    them from the output; ``prefix="drop"`` removes them before the decoder (Point-MAE's encoder has none, so its
    decoder sees only group tokens).

    Args:
        in_dim: width of the incoming encoder tokens; a Linear maps them to `decoder_dim` when it differs
            (MAE's ``decoder_embed``; Point-MAE uses the encoder width, 384).
        decoder_dim, depth, num_heads, mlp_ratio: the timm `Block` stack (Point-MAE: 384, 4, 6, 4).
        group_size: ``K``, points predicted per group (32).
        head: ``"linear"`` (Point-MAE's ``increase_dim``: ``D -> K * 3``) or ``"folding"`` (FoldingNet).
        folding_dim: hidden width of the folding MLPs.
        drop_path_rate: stochastic depth over the blocks (Point-MAE: 0.1).
        prefix: ``"keep"`` or ``"drop"`` the incoming prefix / suffix tokens (see above).
    """

    def __init__(
        self,
        in_dim: int = 384,
        decoder_dim: int = 384,
        depth: int = 4,
        num_heads: int = 6,
        group_size: int = 32,
        head: DecoderHead = "linear",
        mlp_ratio: float = 4.0,
        folding_dim: int = 256,
        drop_path_rate: float = 0.0,
        prefix: PrefixMode = "keep",
    ):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("decoder_dim", decoder_dim), ("group_size", group_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if num_heads < 1 or decoder_dim % num_heads:
            raise ValueError(f"decoder_dim ({decoder_dim}) must be divisible by num_heads ({num_heads})")
        if head not in DECODER_HEADS:
            raise ValueError(f"head must be one of {DECODER_HEADS}, got {head!r}")
        if prefix not in PREFIX_MODES:
            raise ValueError(f"prefix must be one of {PREFIX_MODES}, got {prefix!r}")
        self.in_dim, self.decoder_dim, self.group_size = in_dim, decoder_dim, group_size
        self.head_kind, self.prefix = head, prefix
        self.embed = nn.Linear(in_dim, decoder_dim) if in_dim != decoder_dim else nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.context_pos = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.pos_mlp = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, decoder_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(decoder_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(decoder_dim)
        self.blocks.apply(init_xavier)  # Point-MAE's decoder: xavier-uniform Linear, unit LayerNorm
        self.norm.apply(init_xavier)
        if head == "linear":
            self.head: nn.Module = nn.Linear(decoder_dim, group_size * 3)
        else:
            self.head = _Folding(decoder_dim, group_size, folding_dim)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.context_pos, std=0.02)

    def forward(self, tokens: Tokens, centers: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Predict the local points of every group.

        Args:
            tokens: the encoder's output for the visible groups: ``x [B, P + G_vis + S, in_dim]``, the grid tokens in
                group order (as `select_visible` gives them), P / S prefix / suffix tokens (see the class). A
                ``mask`` must mark every token real; ``pos`` is not used (`centers` is).
            centers: ``[B, G, 3]`` the centres of *all* groups (`group_points`' second output).
            masked: ``[B, G]`` bool, True = hidden from the encoder; the same count in every cloud.
        Returns ``[B, G, K, 3]``: points relative to their group centre for every group, in group order. The loss
        (`loss`) reads the hidden groups only; the visible groups' predictions are the decoder's reconstructions of
        what it was shown (MAE's convention: predict everywhere, score the hidden part).
        """
        if not isinstance(tokens, Tokens):
            raise TypeError(f"tokens must be Tokens, got {type(tokens).__name__}")
        if not isinstance(centers, torch.Tensor) or centers.dim() != 3 or centers.shape[-1] != 3:
            raise ValueError(f"centers must be [B, G, 3], got {getattr(centers, 'shape', type(centers))}")
        bsz, g, _ = centers.shape
        if tokens.batch_size != bsz:
            raise ValueError(f"tokens have batch {tokens.batch_size} but centers have batch {bsz}")
        if tokens.dim != self.in_dim:
            raise ValueError(f"tokens have width {tokens.dim}, this decoder was built with in_dim={self.in_dim}")
        vis = _check_masked(masked, bsz, g)
        if tokens.num_grid_tokens != vis:
            raise ValueError(
                f"tokens hold {tokens.num_grid_tokens} group tokens (after {tokens.num_prefix} prefix and "
                f"{tokens.num_suffix} suffix tokens) but masked leaves {vis} of {g} groups visible per cloud"
            )
        if tokens.mask is not None and not bool(tokens.mask.all()):
            raise ValueError("tokens.mask marks padded tokens; the decoder needs every visible group's token real")
        if masked.device != centers.device or tokens.x.device != centers.device:
            raise ValueError(
                f"tokens ({tokens.x.device}), centers ({centers.device}) and masked ({masked.device}) must share "
                "a device"
            )
        x = self.embed(tokens.x)
        grid = x[:, tokens.num_prefix : tokens.num_tokens - tokens.num_suffix]  # [B, G_vis, D]
        # place the visible tokens at their groups, the mask token at the hidden ones
        slot = ((~masked).cumsum(1) - 1).clamp_min(0)  # [B, G]: a visible group's index among the visible
        placed = grid.gather(1, slot[..., None].expand(-1, -1, x.shape[-1])) if vis else x.new_zeros(bsz, g, 1)
        seq = torch.where(masked[..., None], self.mask_token.to(x.dtype), placed)
        pos = self.pos_mlp(centers.to(x.dtype))
        before, after = (tokens.num_prefix, tokens.num_suffix) if self.prefix == "keep" else (0, 0)
        if before or after:
            ctx = self.context_pos.to(x.dtype)
            seq = torch.cat([x[:, :before], seq, x[:, x.shape[1] - after :]], dim=1)
            pos = torch.cat([ctx.expand(bsz, before, -1), pos, ctx.expand(bsz, after, -1)], dim=1)
        for block in self.blocks:
            seq = block(seq + pos)
        out = self.norm(seq[:, before : before + g]).reshape(bsz * g, -1)
        return self.head(out).reshape(bsz, g, self.group_size, 3)

    def loss(
        self,
        pred: torch.Tensor,
        groups_local: torch.Tensor,
        masked: torch.Tensor,
        convention: ChamferConvention = "l2",
    ) -> torch.Tensor:
        """Point-MAE's reconstruction loss: the Chamfer distance between predicted and true local points, averaged
        over the hidden groups only (each hidden group is one cloud pair).

        Args:
            pred: ``[B, G, K, 3]`` (`forward`'s output); groups_local: ``[B, G, K', 3]`` true points relative to their
                centres (`group_points`' first output, xyz only); masked: ``[B, G]`` bool; convention: ``"l2"`` or
                ``"l1"`` (`chamfer_distance`).
        Returns a scalar.
        """
        if not isinstance(pred, torch.Tensor) or pred.dim() != 4 or pred.shape[-1] != 3:
            raise ValueError(f"pred must be [B, G, K, 3], got {getattr(pred, 'shape', type(pred))}")
        if not isinstance(groups_local, torch.Tensor) or groups_local.dim() != 4 or groups_local.shape[-1] != 3:
            raise ValueError(
                f"groups_local must be [B, G, K, 3] (xyz only: pass groups[..., :3]), got "
                f"{getattr(groups_local, 'shape', type(groups_local))}"
            )
        if groups_local.shape[:2] != pred.shape[:2]:
            raise ValueError(f"pred {tuple(pred.shape)} and groups_local {tuple(groups_local.shape)} differ in [B, G]")
        _check_masked(masked, pred.shape[0], pred.shape[1])
        if not bool(masked.any()):
            raise ValueError("masked hides no group: the reconstruction loss is over hidden groups only")
        return chamfer_distance(pred[masked], groups_local[masked], convention=convention)

    @staticmethod
    def render(pred: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """Absolute points for visualisation: ``pred [B, G, K, 3]`` (local) + ``centers [B, G, 3]`` ->
        ``[B, G * K, 3]``, group by group (Point-MAE's ``rebuild_points + center``)."""
        if not isinstance(pred, torch.Tensor) or pred.dim() != 4 or pred.shape[-1] != 3:
            raise ValueError(f"pred must be [B, G, K, 3], got {getattr(pred, 'shape', type(pred))}")
        if not isinstance(centers, torch.Tensor) or tuple(centers.shape) != (*pred.shape[:2], 3):
            raise ValueError(
                f"centers must be [B, G, 3] = {[*pred.shape[:2], 3]}, got {getattr(centers, 'shape', type(centers))}"
            )
        return (pred + centers[:, :, None, :]).flatten(1, 2)

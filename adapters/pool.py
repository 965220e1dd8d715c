"""`pool`: InfMLLM's pool-adapter (exact cell means) and Open-Qwen2VL's adaptive average pooling, then a projection.

Both pool the token grid (1D audio, 2D image, 3D video) to a smaller grid in row-major order, keep true positions
and masks, and project to the LLM width. An order-preserving, parameter-light alternative to Q-Former queries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_mm import Tokens

from .base import Adapter
from .projections import _init_linear
from .registry import register_adapter

__all__ = ["PoolAdapter", "pool_grid"]

POOL_MODES = ("exact", "adaptive")
POOL_PROJS = ("mlp", "linear", "none")
_ADAPTIVE_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _as_tuple(value: int | tuple[int, ...] | list[int], name: str) -> tuple[int, ...]:
    out = (value,) if isinstance(value, int) else tuple(value)
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in out):
        raise ValueError(f"{name} must be a positive int or a tuple of positive ints, got {value!r}")
    return out


def _square_side(n: int, who: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"{who}: a plain [B, N, D] tensor is read as a square 2D grid, but N={n} is not a square; "
            "pass Tokens with grid (and num_prefix / num_suffix) instead"
        )
    return side


def _check_grid(tokens: Tokens, who: str) -> tuple[int, ...]:
    """The grid of `tokens`, checked against its token count (Tokens fields may be reassigned after validation)."""
    if tokens.grid is None:
        raise ValueError(f"{who} needs Tokens.grid (the regular grid of the non-special tokens), got grid=None")
    n = tokens.num_grid_tokens
    if math.prod(tokens.grid) != n:
        raise ValueError(
            f"{who}: Tokens.grid {tokens.grid} holds {math.prod(tokens.grid)} tokens, but there are {n} grid tokens "
            f"(N={tokens.num_tokens}, num_prefix={tokens.num_prefix}, num_suffix={tokens.num_suffix})"
        )
    return tokens.grid


_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _grid_mean(x: torch.Tensor, grid: tuple[int, ...], out: tuple[int, ...], mode: str) -> torch.Tensor:
    """Cell means over the grid, ``[B, prod(grid), C] -> [B, prod(out), C]`` (row-major): ``avg_poolNd`` with
    kernel = stride = ``grid[i] // out[i]`` (exact) or ``adaptive_avg_poolNd`` to ``out`` (adaptive)."""
    b, _, c = x.shape
    y = x.transpose(1, 2).reshape(b, c, *grid)
    if mode == "exact":
        cell = tuple(g // o for g, o in zip(grid, out))
        y = _POOLS[len(grid)](y, cell, cell)
    else:
        y = _ADAPTIVE_POOLS[len(grid)](y, out)
    return y.reshape(b, c, -1).transpose(1, 2)


def pool_grid(
    x: torch.Tensor,
    grid: tuple[int, ...],
    out: tuple[int, ...],
    mode: str = "exact",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average pooling of grid tokens to the grid `out`, over real tokens only.

    Args:
        x: ``[B, prod(grid), C]`` row-major grid tokens (features, or positions).
        grid / out: input and output grid sizes, same length (1 to 3 axes), ``out[i] <= grid[i]``.
        mode: ``exact`` (non-overlapping cells of ``grid[i] // out[i]``, needs divisible sizes) or ``adaptive``
            (the cells of ``adaptive_avg_poolNd``, possibly overlapping by one token).
        mask: ``[B, prod(grid)]`` bool, True = real, or None.
    Returns:
        ``(y [B, prod(out), C], out_mask [B, prod(out)] | None)``: each cell is the mean of its real tokens; a cell
        without real tokens is zero and False in ``out_mask``.
    """
    if mask is None:
        return _grid_mean(x, grid, out, mode), None
    m = mask.unsqueeze(-1)
    x = x.masked_fill(~m, 0.0)  # not x * m: padding may hold inf / nan
    m = m.to(x.dtype)
    total, count = _grid_mean(x, grid, out, mode), _grid_mean(m, grid, out, mode)  # sums / cell size, both
    real = count > 0
    return torch.where(real, total / count.clamp_min(torch.finfo(x.dtype).tiny), 0.0), real.squeeze(-1)


@register_adapter("pool")
class PoolAdapter(Adapter):
    """Pool the token grid to a smaller grid, then project (InfMLLM pool-adapter; Open-Qwen2VL ``avgpool``).

    Args:
        grid_out: the output grid. An int ``k``: ``k`` tokens for a 1D grid, ``k x k`` for a 2D grid, and for a 3D
            ``(T, H, W)`` grid ``k x k`` per frame with ``T // temporal_factor`` frames (``ceil`` in adaptive mode).
            A tuple gives every axis (its length must equal the grid's). InfMLLM's ``pool_out_size`` and
            Open-Qwen2VL's ``sqrt(query_num)`` are this number.
        mode: ``exact`` — InfMLLM: non-overlapping average over the cells ``grid[i] / out[i]`` (each axis must
            divide; otherwise use ``mode="adaptive"``). ``adaptive`` — Open-Qwen2VL: ``adaptive_avg_pool1d/2d/3d``
            to ``grid_out``, any grid size. On divisible grids both give the same result.
        proj: ``mlp`` (InfMLLM: ``Linear(in, hidden) -> GELU -> Linear(hidden, out)``), ``linear``
            (``Linear(in, out)``) or ``none`` (identity, needs ``in_dim == out_dim``).
        cell: instead of ``grid_out`` (exact mode only): the cell size per axis (an int: the same on every axis;
            for a 3D grid an int is the spatial size and ``temporal_factor`` the temporal one). The output grid then
            follows the input: ``grid[i] // cell[i]`` — a fixed window length suits variable-length audio.
        temporal_factor: 3D grids with an int ``grid_out`` or ``cell``: frames averaged per output frame (default 1).
        keep_special: keep the prefix / suffix tokens (cls, registers), projected by the same projection, around the
            pooled grid (their positions and mask unchanged). Default False: dropped, as InfMLLM drops CLS.
        hidden_dim: hidden width of the ``mlp`` projection (default ``out_dim``).
        bias / init_std: the projection's biases and trunc-normal init std.

    Positions: each output token's ``pos`` is the mean of the positions of the real tokens in its cell (the centre
    of its cell for an unmasked grid; pos units are the input's); a cell without real tokens gets the mean over all
    its tokens. Input without ``pos`` gives output without ``pos``.

    Mask: features are averaged over the real tokens of a cell only, so padding never changes a cell that holds a
    real token. A cell with no real token is zero before the projection and False in the output mask.

    Shape: `Tokens` ``[B, P + prod(grid) + S, in_dim]`` -> `Tokens` ``[B, prod(grid_out), out_dim]`` with the new
    ``grid`` / ``pos`` / ``mask`` (``num_prefix`` / ``num_suffix`` 0, or kept with ``keep_special``). A plain
    tensor ``[B, N, in_dim]`` is read as a square 2D grid without special tokens and gives a plain tensor back.
    """

    changes_token_count = True

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid_out: int | tuple[int, ...] | None = None,
        mode: str = "exact",
        proj: str = "mlp",
        cell: int | tuple[int, ...] | None = None,
        temporal_factor: int = 1,
        keep_special: bool = False,
        hidden_dim: int | None = None,
        bias: bool = True,
        init_std: float = 0.02,
    ):
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"pool mode must be one of {POOL_MODES}, got {mode!r}")
        if proj not in POOL_PROJS:
            raise ValueError(f"pool proj must be one of {POOL_PROJS}, got {proj!r}")
        if (grid_out is None) == (cell is None):
            raise ValueError(
                f"pool needs exactly one of grid_out (output grid) and cell (cell size), got "
                f"grid_out={grid_out!r}, cell={cell!r}"
            )
        if cell is not None and mode != "exact":
            raise ValueError("pool: cell sizes are for mode='exact'; mode='adaptive' pools to grid_out")
        if not (isinstance(temporal_factor, int) and temporal_factor >= 1):
            raise ValueError(f"pool temporal_factor must be an int >= 1, got {temporal_factor!r}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mode, self.proj_kind, self.keep_special = mode, proj, keep_special
        self.grid_out = None if grid_out is None else _as_tuple(grid_out, "pool grid_out")
        self.cell = None if cell is None else _as_tuple(cell, "pool cell")
        self.temporal_factor = temporal_factor
        if temporal_factor != 1 and len(self.grid_out or self.cell) > 1:
            raise ValueError("pool temporal_factor applies to an int grid_out / cell only; a tuple sets every axis")
        if proj == "none":
            if in_dim != out_dim:
                raise ValueError(f"pool proj='none' needs in_dim == out_dim, got {in_dim} and {out_dim}")
            self.proj = nn.Identity()
        elif proj == "linear":
            self.proj = nn.Linear(in_dim, out_dim, bias=bias)
        else:
            hidden = hidden_dim or out_dim
            self.proj = nn.Sequential(
                nn.Linear(in_dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, out_dim, bias=bias)
            )
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m, init_std)

    # ------------------------------------------------------------------ grid arithmetic
    def output_grid(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """The pooled grid for an input `grid` (raises a clear error where this mode cannot pool it)."""
        grid = tuple(grid)
        nd = len(grid)
        if nd not in _ADAPTIVE_POOLS:
            raise ValueError(f"pool works on 1D, 2D or 3D grids, got grid {grid}")
        spec = self.grid_out if self.grid_out is not None else self.cell
        name = "grid_out" if self.grid_out is not None else "cell"
        tf = self.temporal_factor
        if tf != 1 and nd != 3:
            raise ValueError(f"pool temporal_factor={tf} applies to 3D (T, H, W) grids, got grid {grid}")
        if len(spec) == 1 and nd == 3:  # an int on a 3D grid: k x k spatial, temporal_factor frames per cell
            if self.cell is not None:
                spec = (tf, *spec * 2)
            elif self.mode == "exact":
                if grid[0] % tf:
                    raise ValueError(
                        f"pool mode='exact': {grid[0]} frames are not divisible by temporal_factor={tf}; "
                        "use mode='adaptive'"
                    )
                spec = (grid[0] // tf, *spec * 2)
            else:
                spec = (-(-grid[0] // tf), *spec * 2)
        elif len(spec) == 1:
            spec = spec * nd
        if len(spec) != nd:
            raise ValueError(f"pool {name}={spec} has {len(spec)} axes, but the input grid {grid} has {nd}")
        if self.cell is not None:
            if any(c > g for c, g in zip(spec, grid)):
                raise ValueError(f"pool cell {spec} is larger than the input grid {grid}")
            if any(g % c for c, g in zip(spec, grid)):
                raise ValueError(
                    f"pool mode='exact': grid {grid} is not divisible into cells of {spec}; use mode='adaptive' "
                    "with grid_out"
                )
            return tuple(g // c for c, g in zip(spec, grid))
        if any(o > g for o, g in zip(spec, grid)):
            raise ValueError(f"pool grid_out {spec} is larger than the input grid {grid}: pooling cannot add tokens")
        if self.mode == "exact" and any(g % o for o, g in zip(spec, grid)):
            raise ValueError(f"pool mode='exact': grid {grid} is not divisible by grid_out {spec}; use mode='adaptive'")
        return spec

    def num_output_tokens(self, input_tokens: int | Tokens) -> int:
        """Output count for `Tokens` (exact), or for an int count of grid tokens without special tokens.

        An int is read as a grid of ``len(grid_out)`` axes when ``grid_out`` is a tuple, else as a square 2D grid.
        """
        if isinstance(input_tokens, Tokens):
            special = input_tokens.num_prefix + input_tokens.num_suffix if self.keep_special else 0
            return math.prod(self.output_grid(_check_grid(input_tokens, "pool"))) + special
        if self.grid_out is not None and len(self.grid_out) > 1:
            return math.prod(self.output_grid(self.grid_out))  # the count does not depend on the input size
        side = _square_side(input_tokens, "pool.num_output_tokens")
        return math.prod(self.output_grid((side, side)))

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: Tokens | torch.Tensor) -> Tokens | torch.Tensor:
        is_tokens = isinstance(tokens, Tokens)
        self._check(tokens.x if is_tokens else tokens)
        if not is_tokens:
            side = _square_side(tokens.shape[1], "pool")
            tokens = Tokens(x=tokens, grid=(side, side))
        grid = _check_grid(tokens, "pool")
        out = self.output_grid(grid)
        sl = slice(tokens.num_prefix, tokens.num_tokens - tokens.num_suffix)
        mask = tokens.mask[:, sl] if tokens.mask is not None else None
        x, out_mask = pool_grid(tokens.grid_tokens(), grid, out, self.mode, mask)
        pos = None
        if tokens.pos is not None:
            g_pos = tokens.pos[:, sl]
            pos, _ = pool_grid(g_pos, grid, out, self.mode, mask)
            if mask is not None:  # cells without real tokens: the mean over all their tokens
                pos = torch.where(out_mask.unsqueeze(-1), pos, pool_grid(g_pos, grid, out, self.mode)[0])
        num_prefix = num_suffix = 0
        if self.keep_special and (tokens.num_prefix or tokens.num_suffix):
            num_prefix, num_suffix = tokens.num_prefix, tokens.num_suffix
            x = torch.cat([tokens.prefix_tokens(), x, tokens.suffix_tokens()], dim=1)
            if pos is not None:
                pos = torch.cat([tokens.pos[:, : sl.start], pos, tokens.pos[:, sl.stop :]], dim=1)
            if out_mask is not None:
                out_mask = torch.cat([tokens.mask[:, : sl.start], out_mask, tokens.mask[:, sl.stop :]], dim=1)
        y = self.proj(x)
        if not is_tokens:
            return y
        return Tokens(
            x=y,
            mask=out_mask,
            pos=pos,
            grid=out,
            num_prefix=num_prefix,
            num_suffix=num_suffix,
            modality=tokens.modality,
        )

    def extra_repr(self) -> str:
        spec = f"grid_out={self.grid_out}" if self.grid_out is not None else f"cell={self.cell}"
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, {spec}, mode={self.mode!r}, proj={self.proj_kind!r}"

"""`pool` adapter: InfMLLM exact cell means and Open-Qwen2VL adaptive pooling, against hand-computed means and an
explicit loop over adaptive pooling's bins (``[floor(i L / out), ceil((i + 1) L / out))``), masked and unmasked."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

import adapters.pool  # noqa: F401  (registers "pool")
from adapters import create_adapter
from adapters.pool import PoolAdapter
from tokenizers_mm import Tokens


def grid_pos(grid: tuple[int, ...], batch: int, prefix: int = 0) -> torch.Tensor:
    """``[B, prefix + prod(grid), len(grid)]`` integer coordinates, row-major; prefix tokens at -1."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij"), -1)
    coords = torch.cat([torch.full((prefix, len(grid)), -1.0), coords.reshape(-1, len(grid))])
    return coords.unsqueeze(0).expand(batch, -1, -1).clone()


def make_tokens(grid, dim=6, batch=2, prefix=0, suffix=0, seed=0, mask=None) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    n = prefix + torch.Size(grid).numel() + suffix
    pos = torch.cat([grid_pos(grid, batch, prefix), torch.full((batch, suffix, len(grid)), -2.0)], dim=1)
    x = torch.randn(batch, n, dim, generator=g)
    return Tokens(x=x, mask=mask, pos=pos, grid=grid, num_prefix=prefix, num_suffix=suffix, modality="image")


def identity_pool(dim=6, **kw) -> PoolAdapter:
    return create_adapter("pool", dim, dim, proj="none", **kw)


def hand_cell_means(x: torch.Tensor, grid, out) -> torch.Tensor:
    """Row-major loop over output cells, each the plain mean of its ``grid[i] // out[i]`` block."""
    x = x.reshape(x.shape[0], *grid, x.shape[-1])
    cell = [g // o for g, o in zip(grid, out)]
    rows = []
    for idx in itertools.product(*[range(o) for o in out]):
        block = x[(slice(None), *[slice(i * c, (i + 1) * c) for i, c in zip(idx, cell)])]
        rows.append(block.reshape(x.shape[0], -1, x.shape[-1]).mean(1))
    return torch.stack(rows, dim=1)


# ---------------------------------------------------------------------------------------------- exact mode
def test_exact_2d_equals_hand_cell_means_in_row_major_order():
    t = make_tokens((8, 12), prefix=1)
    out = identity_pool(grid_out=(4, 3))(t)
    assert out.grid == (4, 3) and out.num_prefix == 0 and out.x.shape == (2, 12, 6)
    torch.testing.assert_close(out.x, hand_cell_means(t.grid_tokens(), (8, 12), (4, 3)))
    # pos = the centre of each cell, row-major: cell (r, c) covers rows 2r..2r+1 and cols 4c..4c+3
    want = torch.tensor([[2 * r + 0.5, 4 * c + 1.5] for r in range(4) for c in range(3)])
    torch.testing.assert_close(out.pos, want.expand(2, -1, -1))
    assert out.mask is None and out.modality == "image"


def test_int_grid_out_is_square_and_matches_infmllm_reshape():
    t = make_tokens((16, 16), prefix=1, dim=4)
    out = identity_pool(dim=4, grid_out=8)(t)
    # InfMLLM Pooler: drop cls, (b, s, s, d) -> (b, k, s/k, k, s/k, d).mean over the two cell axes
    ref = t.x[:, 1:].reshape(2, 8, 2, 8, 2, 4).mean(dim=(2, 4)).reshape(2, 64, 4)
    torch.testing.assert_close(out.x, ref)
    assert out.grid == (8, 8)


def test_exact_1d_audio_grid_out_and_window():
    t = make_tokens((20,), prefix=1, suffix=1)
    out = identity_pool(grid_out=5)(t)
    torch.testing.assert_close(out.x, hand_cell_means(t.grid_tokens(), (20,), (5,)))
    torch.testing.assert_close(out.pos[0, :, 0], torch.tensor([1.5, 5.5, 9.5, 13.5, 17.5]))
    # a fixed window length instead of a fixed count: the output follows the input length
    win = identity_pool(cell=4)
    assert win(t).grid == (5,)
    torch.testing.assert_close(win(t).x, out.x)
    assert win(make_tokens((28,))).grid == (7,)


def test_exact_3d_video_spatial_and_temporal_factor():
    t = make_tokens((4, 6, 6), prefix=1)
    out = identity_pool(grid_out=3, temporal_factor=2)(t)
    assert out.grid == (2, 3, 3) and out.x.shape == (2, 18, 6)
    torch.testing.assert_close(out.x, hand_cell_means(t.grid_tokens(), (4, 6, 6), (2, 3, 3)))
    torch.testing.assert_close(out.pos[0, 0], torch.tensor([0.5, 0.5, 0.5]))
    # default temporal_factor 1 keeps every frame; a tuple sets every axis
    assert identity_pool(grid_out=3)(t).grid == (4, 3, 3)
    torch.testing.assert_close(identity_pool(grid_out=(2, 3, 3))(t).x, out.x)
    torch.testing.assert_close(identity_pool(cell=2, temporal_factor=2)(t).x, out.x)


@pytest.mark.parametrize("grid,grid_out", [((8, 8), 4), ((12,), 3), ((4, 6, 6), (2, 3, 3))])
def test_exact_equals_adaptive_on_divisible_grids(grid, grid_out):
    t = make_tokens(grid)
    torch.testing.assert_close(
        identity_pool(grid_out=grid_out)(t).x, identity_pool(grid_out=grid_out, mode="adaptive")(t).x
    )


# ---------------------------------------------------------------------------------------------- adaptive mode
def tol(dtype: torch.dtype, k: float = 32.0) -> dict[str, float]:
    """``assert_close`` tolerances of `k` units of `dtype`'s machine epsilon (against a float64 reference)."""
    eps = torch.finfo(dtype).eps
    return {"rtol": k * eps, "atol": k * eps}


def bin_edges(length: int, out: int) -> list[tuple[int, int]]:
    """Adaptive average pooling's bins (the definition PyTorch documents and implements): bin ``i`` of ``out`` over
    ``length`` covers ``[floor(i * length / out), ceil((i + 1) * length / out))``."""
    return [((i * length) // out, -(-((i + 1) * length) // out)) for i in range(out)]


def reference_pool(
    x: torch.Tensor, grid: tuple[int, ...], out: tuple[int, ...], mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An explicit float64 loop over samples and output cells (row-major): each cell the mean of the grid tokens in
    its bin (`bin_edges` per axis) that are real under `mask` (all when None).

    Returns ``(mean_over_real [B, prod(out), C], mean_over_all [B, prod(out), C], has_real [B, prod(out)])``, with
    ``mean_over_real`` zero where the cell holds no real token (the adapter's documented masked semantics)."""
    b, _, c = x.shape
    x = x.double().reshape(b, *grid, c)
    m = torch.ones(b, *grid, dtype=torch.bool) if mask is None else mask.reshape(b, *grid)
    edges = [bin_edges(g, o) for g, o in zip(grid, out)]
    real_means = torch.zeros(b, math.prod(out), c, dtype=torch.float64)
    all_means = torch.zeros(b, math.prod(out), c, dtype=torch.float64)
    has_real = torch.zeros(b, math.prod(out), dtype=torch.bool)
    for s in range(b):
        for j, cell in enumerate(itertools.product(*[range(o) for o in out])):
            members = itertools.product(*[range(*edges[a][i]) for a, i in enumerate(cell)])
            total_all, total_real, n_all, n_real = torch.zeros(c, dtype=torch.float64), 0.0, 0, 0
            for idx in members:
                total_all = total_all + x[(s, *idx)]
                n_all += 1
                if m[(s, *idx)]:
                    total_real = total_real + x[(s, *idx)]
                    n_real += 1
            all_means[s, j] = total_all / n_all
            if n_real:
                real_means[s, j] = total_real / n_real
                has_real[s, j] = True
    return real_means, all_means, has_real


def test_bin_edges_follow_the_definition_on_a_hand_example():
    # 7 -> 3: [0, 7/3) -> 0..2, [7/3, 14/3) -> 2..4, [14/3, 7) -> 4..6: neighbouring bins share a token
    assert bin_edges(7, 3) == [(0, 3), (2, 5), (4, 7)]
    assert bin_edges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]  # divisible: the exact cells


def random_pos(grid, batch, prefix, suffix, gen, dtype) -> torch.Tensor:
    """Random positions (not a regular grid) for the grid tokens; special tokens at -1 / -2."""
    nd = len(grid)
    g_pos = torch.randn(batch, math.prod(grid), nd, generator=gen, dtype=torch.float64) * 3.0
    special = lambda k, value: torch.full((batch, k, nd), value, dtype=torch.float64)  # noqa: E731
    return torch.cat([special(prefix, -1.0), g_pos, special(suffix, -2.0)], dim=1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "grid,grid_out",
    [
        ((23,), (7,)),
        ((14, 14), (5, 5)),
        ((7, 9), (3, 4)),
        ((27, 27), (12, 12)),  # Open-Qwen2VL: SigLIP 27 x 27 -> 144 tokens
        ((5, 7, 9), (2, 3, 4)),
    ],
)
def test_adaptive_equals_the_bin_definition(grid, grid_out, dtype):
    gen = torch.Generator().manual_seed(sum(grid) * 7 + sum(grid_out))
    b, d, n = 2, 5, math.prod(grid)
    x = torch.randn(b, 1 + n + 1, d, generator=gen, dtype=torch.float64).to(dtype)
    pos = random_pos(grid, b, 1, 1, gen, dtype)
    t = Tokens(x=x, pos=pos, grid=grid, num_prefix=1, num_suffix=1, modality="image")
    out = identity_pool(dim=d, grid_out=grid_out, mode="adaptive")(t)
    assert out.grid == grid_out and out.num_prefix == out.num_suffix == 0 and out.mask is None
    assert out.x.dtype == dtype and out.pos.dtype == dtype
    ref_x, _, _ = reference_pool(x[:, 1:-1], grid, grid_out)
    ref_pos, _, _ = reference_pool(pos[:, 1:-1], grid, grid_out)
    torch.testing.assert_close(out.x.double(), ref_x, **tol(dtype))
    torch.testing.assert_close(out.pos.double(), ref_pos, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "grid,grid_out,mode",
    [
        ((23,), (7,), "adaptive"),
        ((7, 9), (3, 4), "adaptive"),
        ((9, 9), (4, 4), "adaptive"),
        ((5, 7, 9), (2, 3, 4), "adaptive"),
        ((8, 12), (4, 3), "exact"),
        ((4, 6, 6), (2, 3, 3), "exact"),
    ],
)
def test_masked_pooling_equals_the_mean_over_real_tokens_of_each_bin(grid, grid_out, mode, dtype):
    """Masked path, against the loop: features and positions averaged over the real tokens of each bin only; a bin
    without a real token is zero before the projection, False in the mask, and its position is the mean over all its
    tokens. The linear projection's weight and bias are random, so the zero of an empty cell shows as the bias."""
    gen = torch.Generator().manual_seed(sum(grid) * 11 + sum(grid_out))
    b, d, n = 3, 5, math.prod(grid)
    x = torch.randn(b, 1 + n, d, generator=gen, dtype=torch.float64).to(dtype)
    pos = random_pos(grid, b, 1, 0, gen, dtype)
    mask = torch.rand(b, 1 + n, generator=gen) > 0.5
    mask[0, 1 : 1 + n // 2] = False  # sample 0: its first half padded, so some cells hold no real token
    mask[1, 1:] = True  # sample 1: no padding
    mask[2, 1 + n // 3 :] = False  # sample 2: a random prefix, then padding
    t = Tokens(x=x, mask=mask, pos=pos, grid=grid, num_prefix=1, modality="image")
    adapter = create_adapter("pool", d, 4, grid_out=grid_out, mode=mode, proj="linear").to(dtype)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        out = adapter(t)
    ref_x, _, has_real = reference_pool(x[:, 1:], grid, grid_out, mask[:, 1:])
    ref_pos_real, ref_pos_all, _ = reference_pool(pos[:, 1:], grid, grid_out, mask[:, 1:])
    assert (~has_real[0]).any() and has_real[0].any() and has_real[1].all(), "the sample must cover every case"
    assert torch.equal(out.mask, has_real)
    w, bias = adapter.proj.weight.double(), adapter.proj.bias.double()
    torch.testing.assert_close(out.x.double(), ref_x @ w.T + bias, **tol(dtype, 64))
    ref_pos = torch.where(has_real.unsqueeze(-1), ref_pos_real, ref_pos_all)
    torch.testing.assert_close(out.pos.double(), ref_pos, **tol(dtype))


def test_adaptive_int_grid_out_and_3d_temporal_ceil():
    assert identity_pool(grid_out=5, mode="adaptive")(make_tokens((14, 14))).grid == (5, 5)
    assert identity_pool(grid_out=5, mode="adaptive")(make_tokens((13,))).grid == (5,)
    assert identity_pool(grid_out=2, mode="adaptive", temporal_factor=2)(make_tokens((5, 3, 3))).grid == (3, 2, 2)


# ---------------------------------------------------------------------------------------------- masks
def test_masked_cells_average_real_tokens_only_and_empty_cells_are_masked():
    mask = torch.ones(2, 1 + 16, dtype=torch.bool)
    mask[0, 1 + 6 :] = False  # sample 0: 6 real tokens of a 16-token audio grid (cells of 4)
    t = make_tokens((16,), prefix=1, mask=mask)
    out = identity_pool(grid_out=4)(t)
    g = t.grid_tokens()
    torch.testing.assert_close(out.x[0, 0], g[0, :4].mean(0))
    torch.testing.assert_close(out.x[0, 1], g[0, 4:6].mean(0))  # half-real cell: its real tokens only
    torch.testing.assert_close(out.pos[0, 1], torch.tensor([4.5]))
    assert out.mask.tolist() == [[True, True, False, False], [True] * 4]
    assert (out.x[0, 2:] == 0).all()  # no real token: zero (before the projection), masked out
    torch.testing.assert_close(out.pos[0, 2:, 0], torch.tensor([9.5, 13.5]))  # the cell's own mean position
    torch.testing.assert_close(out.x[1], hand_cell_means(g, (16,), (4,))[1])


@pytest.mark.parametrize("mode", ["exact", "adaptive"])
@pytest.mark.parametrize("proj", ["mlp", "linear"])
def test_padding_values_never_change_real_outputs(mode, proj):
    torch.manual_seed(0)
    adapter = create_adapter("pool", 6, 10, grid_out=(3, 3) if mode == "exact" else (4, 4), mode=mode, proj=proj)
    mask = torch.rand(2, 1 + 81) > 0.4
    mask[:, 1:28] = False  # three whole image rows of padding: empty cells
    t = make_tokens((9, 9), prefix=1, mask=mask)
    garbage = t.x.clone()
    garbage[~mask] = torch.tensor([float("nan"), float("inf"), 1e6, -3, 0, 7]).repeat(int((~mask).sum()), 1)
    garbage_pos = t.pos.clone()
    garbage_pos[~mask] = 123.0
    a = adapter(t)
    b = adapter(dataclasses.replace(t, x=garbage, pos=garbage_pos))
    assert torch.equal(a.mask, b.mask) and a.mask.any() and not a.mask.all()
    torch.testing.assert_close(a.x[a.mask], b.x[b.mask])
    torch.testing.assert_close(a.pos[a.mask], b.pos[b.mask])
    assert torch.isfinite(b.x).all()


def test_padded_video_frames_mask_their_output_frames():
    mask = torch.ones(2, 1 + 4 * 2 * 2, dtype=torch.bool)
    mask[0, 1 + 2 * 4 :] = False  # sample 0: 2 real frames of 4
    t = make_tokens((4, 2, 2), prefix=1, mask=mask)
    out = identity_pool(grid_out=1, temporal_factor=2)(t)
    assert out.grid == (2, 1, 1) and out.mask.tolist() == [[True, False], [True, True]]
    torch.testing.assert_close(out.x[0, 0], t.x[0, 1:9].mean(0))
    torch.testing.assert_close(out.pos[0], torch.tensor([[0.5, 0.5, 0.5], [2.5, 0.5, 0.5]]))


def test_padded_batch_equals_alone_for_audio_windows():
    torch.manual_seed(0)
    adapter = create_adapter("pool", 6, 8, cell=4)
    alone = make_tokens((12,), batch=1, seed=1)
    x = torch.cat([alone.x, torch.randn(1, 8, 6)], dim=1)
    mask = torch.arange(20).unsqueeze(0) < 12
    pos = torch.arange(20.0).view(1, 20, 1)
    padded = Tokens(x=x, mask=mask, pos=pos, grid=(20,), modality="audio")
    a, p = adapter(alone), adapter(padded)
    torch.testing.assert_close(p.x[:, :3], a.x)
    torch.testing.assert_close(p.pos[:, :3], a.pos)
    assert p.mask.tolist() == [[True, True, True, False, False]]


def test_keep_special_keeps_prefix_and_suffix_around_the_pooled_grid():
    mask = torch.ones(2, 1 + 16 + 1, dtype=torch.bool)
    mask[1, -1] = False
    t = make_tokens((4, 4), prefix=1, suffix=1, mask=mask)
    out = identity_pool(grid_out=2, keep_special=True)(t)
    assert (out.num_prefix, out.num_suffix, out.grid, out.num_tokens) == (1, 1, (2, 2), 6)
    torch.testing.assert_close(out.x[:, 0], t.x[:, 0])
    torch.testing.assert_close(out.x[:, -1], t.x[:, -1])
    torch.testing.assert_close(out.pos[:, 0], t.pos[:, 0])
    assert out.mask[:, -1].tolist() == [True, False]
    assert identity_pool(grid_out=2, keep_special=True).num_output_tokens(t) == 6
    assert identity_pool(grid_out=2).num_output_tokens(t) == 4


# ---------------------------------------------------------------------------------------------- projections, API
def test_projections():
    t = make_tokens((4, 4), dim=6)
    mlp = create_adapter("pool", 6, 10, grid_out=2)
    assert [type(m) for m in mlp.proj] == [nn.Linear, nn.GELU, nn.Linear]
    assert mlp.proj[0].out_features == 10 and mlp(t).x.shape == (2, 4, 10)
    assert create_adapter("pool", 6, 10, grid_out=2, proj="mlp", hidden_dim=7).proj[0].out_features == 7
    lin = create_adapter("pool", 6, 10, grid_out=2, proj="linear")
    assert isinstance(lin.proj, nn.Linear)
    pooled = identity_pool(grid_out=2)(t).x
    torch.testing.assert_close(lin(t).x, lin.proj(pooled))
    torch.testing.assert_close(mlp(t).x, mlp.proj(pooled))
    with pytest.raises(ValueError, match="proj='none' needs in_dim == out_dim"):
        create_adapter("pool", 6, 10, grid_out=2, proj="none")
    loss = mlp(t).x.sum()
    loss.backward()
    assert all(p.grad is not None for p in mlp.parameters())


def test_create_by_name_and_plain_tensor_input():
    a = create_adapter("pool", 6, 8, grid_out=4, mode="adaptive", proj="linear")
    assert isinstance(a, PoolAdapter) and a.changes_token_count
    x = torch.randn(2, 100, 6)  # read as a 10 x 10 grid without special tokens
    y = a(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 16, 8)
    torch.testing.assert_close(y, a(Tokens(x=x, grid=(10, 10))).x)
    assert a.num_output_tokens(100) == 16 and a.num_output_tokens(make_tokens((7, 9))) == 16
    assert create_adapter("pool", 6, 8, grid_out=(2, 3, 3)).num_output_tokens(10) == 18
    assert create_adapter("pool", 6, 8, cell=2).num_output_tokens(make_tokens((4, 6), prefix=1)) == 6


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors():
    t = make_tokens((6, 6), prefix=1)
    with pytest.raises(ValueError, match=r"not divisible by grid_out.*use mode='adaptive'"):
        identity_pool(grid_out=4)(t)
    with pytest.raises(ValueError, match=r"grid_out \(8, 8\) is larger than the input grid \(6, 6\)"):
        identity_pool(grid_out=8, mode="adaptive")(t)
    with pytest.raises(ValueError, match=r"cell .* is larger than the input grid"):
        identity_pool(cell=7)(t)
    with pytest.raises(ValueError, match="not divisible into cells"):
        identity_pool(cell=4)(t)
    broken = make_tokens((6, 6), prefix=1)
    broken.grid = (5, 7)  # reassigned after validation
    with pytest.raises(ValueError, match=r"grid \(5, 7\) holds 35 tokens, but there are 36 grid tokens"):
        identity_pool(grid_out=2)(broken)
    with pytest.raises(ValueError, match="N=50 is not a square"):
        identity_pool(grid_out=2)(torch.randn(1, 50, 6))
    with pytest.raises(ValueError, match=r"expects \[B, N, 6\] tokens, got \(2, 37, 5\)"):
        identity_pool(grid_out=2)(dataclasses.replace(t, x=torch.randn(2, 37, 5)))
    with pytest.raises(ValueError, match=r"needs Tokens.grid"):
        identity_pool(grid_out=2)(Tokens(x=torch.randn(1, 9, 6)))
    with pytest.raises(ValueError, match=r"has 3 axes, but the input grid"):
        identity_pool(grid_out=(2, 2, 2))(t)
    with pytest.raises(ValueError, match="1D, 2D or 3D grids"):
        identity_pool(grid_out=1)(make_tokens((2, 2, 2, 2)))
    with pytest.raises(ValueError, match="temporal_factor=2 applies to 3D"):
        identity_pool(grid_out=3, temporal_factor=2)(t)
    with pytest.raises(ValueError, match="5 frames are not divisible by temporal_factor=2"):
        identity_pool(grid_out=1, temporal_factor=2)(make_tokens((5, 2, 2)))
    with pytest.raises(ValueError, match="mode must be one of"):
        create_adapter("pool", 6, 6, grid_out=2, mode="max")
    with pytest.raises(ValueError, match="exactly one of grid_out"):
        create_adapter("pool", 6, 6)
    with pytest.raises(ValueError, match="cell sizes are for mode='exact'"):
        create_adapter("pool", 6, 6, cell=2, mode="adaptive")
    with pytest.raises(ValueError, match="positive int"):
        create_adapter("pool", 6, 6, grid_out=0)

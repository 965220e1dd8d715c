"""`pool` adapter: InfMLLM exact cell means and Open-Qwen2VL adaptive pooling, against hand-computed means and
`torch.nn.functional.adaptive_avg_pool1d/2d/3d`."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
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
@pytest.mark.parametrize(
    "grid,grid_out,fn",
    [
        ((23,), (7,), F.adaptive_avg_pool1d),
        ((14, 14), (5, 5), F.adaptive_avg_pool2d),
        ((7, 9), (3, 4), F.adaptive_avg_pool2d),
        ((27, 27), (12, 12), F.adaptive_avg_pool2d),  # Open-Qwen2VL: SigLIP 27 x 27 -> 144 tokens
        ((5, 7, 9), (2, 3, 4), F.adaptive_avg_pool3d),
    ],
)
def test_adaptive_equals_torch_adaptive_avg_pool(grid, grid_out, fn):
    t = make_tokens(grid, prefix=1, suffix=1, dim=5)
    out = identity_pool(dim=5, grid_out=grid_out, mode="adaptive")(t)
    b, d = 2, 5
    ref = fn(t.grid_tokens().transpose(1, 2).reshape(b, d, *grid), grid_out).reshape(b, d, -1).transpose(1, 2)
    torch.testing.assert_close(out.x, ref, rtol=0, atol=0)
    assert out.grid == grid_out and out.num_prefix == out.num_suffix == 0
    pos_ref = fn(t.pos[:, 1:-1].transpose(1, 2).reshape(b, len(grid), *grid), grid_out)
    torch.testing.assert_close(out.pos, pos_ref.reshape(b, len(grid), -1).transpose(1, 2))


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

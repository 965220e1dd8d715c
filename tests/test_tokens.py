"""`Tokens`: validation, helpers, and pytree registration (design §2)."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from tokenizers_mm import Tokens


def _tokens(**kw) -> Tokens:
    base = dict(
        x=torch.randn(2, 18, 8),
        pos=torch.rand(2, 18, 2),
        grid=(4, 4),
        num_prefix=1,
        num_suffix=1,
        mask=torch.ones(2, 18, dtype=torch.bool),
        modality="image",
    )
    base.update(kw)
    return Tokens(**base)


def test_grid_prefix_suffix_views():
    t = _tokens()
    assert t.grid_tokens().shape == (2, 16, 8)
    torch.testing.assert_close(t.grid_tokens(), t.x[:, 1:17])
    torch.testing.assert_close(t.prefix_tokens(), t.x[:, :1])
    torch.testing.assert_close(t.suffix_tokens(), t.x[:, 17:])
    assert (t.batch_size, t.num_tokens, t.dim, t.num_grid_tokens) == (2, 18, 8, 16)


def test_grid_mask_is_the_grid_tokens_padding():
    mask = torch.ones(2, 18, dtype=torch.bool)
    mask[1, 12:] = False  # sample 1: its last 5 grid tokens and the suffix are padding
    t = _tokens(mask=mask)
    assert t.grid_mask().shape == (2, 16)
    assert t.grid_mask()[0].all() and t.grid_mask()[1].tolist() == [True] * 11 + [False] * 5
    assert _tokens(mask=None).grid_mask() is None


def test_with_x_keeps_metadata_and_allows_new_width():
    t = _tokens()
    u = t.with_x(torch.zeros(2, 18, 32))
    assert u.dim == 32 and u.pos is t.pos and u.mask is t.mask and u.grid == (4, 4) and u.modality == "image"
    with pytest.raises(ValueError, match="keeps B and N"):
        t.with_x(torch.zeros(2, 17, 8))


def test_to_moves_dtype_of_float_fields_only():
    t = _tokens().to(torch.float64)
    assert t.x.dtype == torch.float64 and t.pos.dtype == torch.float64 and t.mask.dtype == torch.bool


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(x=torch.randn(18, 8)), r"must be \[B, N, D\]"),
        (dict(mask=torch.ones(2, 17, dtype=torch.bool)), r"mask must be \[B, N\] = \[2, 18\]"),
        (dict(mask=torch.ones(3, 18, dtype=torch.bool)), r"mask must be \[B, N\]"),
        (dict(mask=torch.ones(2, 18)), "dtype torch.bool"),
        (dict(pos=torch.rand(1, 18, 2)), r"pos must be \[B, N, P\] with B=2, N=18"),
        (dict(pos=torch.rand(2, 18)), r"pos must be \[B, N, P\]"),
        (dict(pos=torch.ones(2, 18, 2, dtype=torch.long)), "floating-point"),
        (dict(grid=(4, 5)), r"grid \(4, 5\) holds 20 tokens, but x has N=18"),
        (dict(num_prefix=-1), ">= 0"),
        (dict(num_prefix=10, num_suffix=10, grid=None), "exceeds the token count"),
    ],
)
def test_validation_errors_say_what_was_expected(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _tokens(**kw)


def test_pytree_round_trip_and_tree_map():
    t = _tokens()
    leaves, spec = pytree.tree_flatten(t)
    assert len(leaves) == 3
    back = pytree.tree_unflatten(leaves, spec)
    assert isinstance(back, Tokens) and back.grid == t.grid and back.num_suffix == 1
    doubled = pytree.tree_map(lambda v: v * 2 if v.is_floating_point() else v, t)
    torch.testing.assert_close(doubled.x, t.x * 2)
    assert doubled.mask.dtype == torch.bool


def test_checkpoint_and_compile_see_through_tokens():
    lin = torch.nn.Linear(8, 8)

    def f(t: Tokens) -> Tokens:
        return t.with_x(lin(t.x))

    t = _tokens(x=torch.randn(2, 18, 8, requires_grad=True))
    out = torch.utils.checkpoint.checkpoint(f, t, use_reentrant=False)
    out.x.sum().backward()
    assert t.x.grad is not None
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(t).x, f(t).x)

"""Axial rotary (VisionLLaMA 2-D RoPE, 1-D / 3-D variants, AS2DRoPE) in HF's rotate_half layout."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from mmblocks.layers.rope import (
    AxialRoPE,
    apply_rotary,
    auto_scale_positions,
    axial_angles,
    axial_rope,
    grid_positions,
    rope_inv_freq,
    sequence_rope,
)
from tokenizers_mm import Tokens


def _scores(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-2, -1)


def test_sequence_rope_equals_hf_default_rotary():
    """1-D axial rope over 0..N-1 is exactly `transformers`' default Llama rotary."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 11, 64)
    cos_hf, sin_hf = rotary(x, torch.arange(11)[None])
    cos, sin = sequence_rope(11, 16)
    torch.testing.assert_close(cos, cos_hf, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_hf, atol=1e-6, rtol=0)


def test_visionllama_frequencies_and_interleaving():
    """2-D: pair 2m rotates by row * theta^(-4m/d), pair 2m+1 by col * theta^(-4m/d)."""
    d, theta = 16, 100.0
    pos = torch.tensor([[[3.0, 5.0]]])
    angles = axial_angles(pos, d, theta)[0, 0]
    assert angles.shape == (d // 2,)
    for m in range(d // 4):
        f = theta ** (-4 * m / d)
        assert angles[2 * m].item() == pytest.approx(3.0 * f)
        assert angles[2 * m + 1].item() == pytest.approx(5.0 * f)
    cos, sin = axial_rope(pos, d, theta=theta)
    torch.testing.assert_close(cos[0, 0], torch.cat([angles.cos(), angles.cos()]))
    torch.testing.assert_close(sin[0, 0], torch.cat([angles.sin(), angles.sin()]))
    torch.testing.assert_close(rope_inv_freq(d, 2, theta), theta ** (-torch.arange(0, d, 4).float() / d))


def test_three_axes_leave_leftover_pairs_unrotated():
    pos = torch.tensor([[[1.0, 2.0, 3.0]]])
    angles = axial_angles(pos, 16, 10000.0)[0, 0]  # 8 pairs: 2 per axis -> 6 used, 2 left over
    assert angles[:3].tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert angles[6:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("num_axes", [1, 2, 3])
def test_scores_depend_only_on_position_differences(num_axes):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 24, generator=g), torch.randn(2, 3, 10, 24, generator=g)
    pos = torch.randint(0, 14, (2, 10, num_axes), generator=g).float()
    shift = torch.tensor([3.0, -5.0, 11.0][:num_axes])
    ref = _scores(q, k, *axial_rope(pos, 24, special_value=None))
    shifted = _scores(q, k, *axial_rope(pos + shift, 24, special_value=None))
    torch.testing.assert_close(shifted, ref, atol=1e-4, rtol=1e-4)
    moved = pos.clone()
    moved[:, 0] += 1.0  # one token moves relative to the others
    assert not torch.allclose(_scores(q, k, *axial_rope(moved, 24, special_value=None)), ref, atol=1e-3)


def test_hf_apply_rotary_consumes_the_same_layout():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 4, 7, 16, generator=g)
    cos, sin = axial_rope(torch.rand(2, 7, 2, generator=g) * 10, 16)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q_hf)
    torch.testing.assert_close(apply_rotary(k, cos, sin), k_hf)


def test_partial_rotary_passes_the_rest():
    x = torch.randn(1, 2, 5, 12)
    cos, sin = axial_rope(torch.rand(1, 5, 2) * 4, 8)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out[..., 8:], x[..., 8:])
    torch.testing.assert_close(out[..., :8], apply_rotary(x[..., :8], cos, sin))


def test_special_tokens_get_the_identity_rotation():
    pos = grid_positions((3, 4), num_prefix=1, num_suffix=1)
    assert pos.shape == (1, 14, 2) and pos[0, 0].tolist() == [-1, -1] and pos[0, -1].tolist() == [-1, -1]
    pos = pos.clone()
    pos[0, -1] = torch.tensor([7.0, 7.0])  # the suffix is special by position in the sequence too
    cos, sin = axial_rope(pos, 8, num_prefix=1, num_suffix=1)
    for i in (0, 13):
        assert torch.equal(cos[0, i], torch.ones(8)) and torch.equal(sin[0, i], torch.zeros(8))
    assert not torch.equal(cos[0, 5], torch.ones(8))
    # pos == -1 marks a special token even without prefix / suffix counts (ImagePatches' convention)
    cos, _ = axial_rope(grid_positions((2, 2), num_prefix=1), 8)
    assert torch.equal(cos[0, 0], torch.ones(8))
    # ... unless disabled (points may sit at -1)
    cos, _ = axial_rope(torch.full((1, 1, 2), -1.0), 8, special_value=None)
    assert not torch.equal(cos[0, 0], torch.ones(8))


def test_auto_scale_maps_a_larger_grid_onto_the_training_range():
    big = grid_positions((28, 28))
    scaled = auto_scale_positions(big, (28, 28), (14, 14))
    assert scaled.min().item() == 0.0 and scaled.max().item() == pytest.approx(13.5)
    # token (2i, 2j) of the 28-grid is rotated exactly like token (i, j) of the training 14-grid
    cos_big, sin_big = axial_rope(big, 16, grid=(28, 28), train_grid=(14, 14))
    cos_ref, sin_ref = axial_rope(grid_positions((14, 14)), 16)
    idx_big = torch.tensor([2 * i * 28 + 2 * j for i in range(14) for j in range(14)])
    torch.testing.assert_close(cos_big[0, idx_big], cos_ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin_big[0, idx_big], sin_ref[0], atol=1e-5, rtol=0)
    # non-square grids scale each axis on its own
    scaled = auto_scale_positions(grid_positions((7, 28)), (7, 28), (14, 14))
    assert scaled[..., 0].max().item() == pytest.approx(12.0) and scaled[..., 1].max().item() == pytest.approx(13.5)
    assert torch.equal(auto_scale_positions(big, (28, 28), None), big)
    with pytest.raises(ValueError, match="needs the tokens' grid"):
        auto_scale_positions(big, None, (14, 14))


def test_axial_rope_module_over_tokens():
    rope = AxialRoPE(16, num_axes=2, train_grid=(4, 4))
    pos = grid_positions((8, 8), num_prefix=1).expand(2, -1, -1)
    tokens = Tokens(torch.randn(2, 65, 32), pos=pos, grid=(8, 8), num_prefix=1, modality="image")
    cos, sin = rope(tokens)
    assert cos.shape == sin.shape == (2, 65, 16)
    ref_cos, _ = axial_rope(pos, 16, num_prefix=1, grid=(8, 8), train_grid=(4, 4))
    torch.testing.assert_close(cos, ref_cos)
    with pytest.raises(ValueError, match=r"needs Tokens.pos \[B, N, 3\]"):
        AxialRoPE(18, num_axes=3)(tokens)
    with pytest.raises(ValueError, match="positive even"):
        axial_rope(pos, 15)
    assert math.isclose(float(cos[0, 0, 0]), 1.0)

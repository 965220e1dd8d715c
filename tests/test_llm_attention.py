"""Attention mode, rotary policy and padding behave as declared, under every backend."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import build_tiny_model

from mmblocks.llm import load_blocks
from mmblocks.llm.load import supported_attn_implementations
from tokenizers_mm import Tokens

FAMILIES = ["llama", "mistral", "qwen3", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox", "bert"]
BACKENDS = ["eager", "sdpa"]


def _supported(family: str, impl: str) -> bool:
    return impl in supported_attn_implementations(build_tiny_model(family).config)


def _first_token_moves_when_last_changes(blocks) -> bool:
    torch.manual_seed(0)
    x = torch.randn(1, 9, blocks.hidden_size)
    y = x.clone()
    y[:, -1] = torch.randn(blocks.hidden_size) * 3.0  # not a constant shift: LayerNorm would erase it
    with torch.no_grad():
        a, b = blocks(x), blocks(y)
    return not torch.allclose(a[:, 0], b[:, 0], atol=1e-6)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_is_bidirectional_and_causal_is_causal(family, impl, tiny_checkpoint):
    if not _supported(family, impl):
        pytest.skip(f"{family} does not support {impl}")
    folder = tiny_checkpoint(family)
    for rope in ("none", "native"):
        bi = load_blocks(folder, [0, 1], attention="bidirectional", rope=rope, attn_implementation=impl)
        ca = load_blocks(folder, [0, 1], attention="causal", rope=rope, attn_implementation=impl)
        assert _first_token_moves_when_last_changes(bi), f"{family}/{impl}: bidirectional must see the last token"
        assert not _first_token_moves_when_last_changes(ca), f"{family}/{impl}: causal must not see the future"


@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree(family, tiny_checkpoint):
    if not _supported(family, "sdpa"):
        pytest.skip(f"{family} does not support sdpa")
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(0))
    for attention in ("bidirectional", "causal"):
        blocks = load_blocks(tiny_checkpoint(family), [1, 2], attention=attention, attn_implementation="eager")
        with torch.no_grad():
            ref = blocks(x)
            blocks.set_attn_implementation("sdpa")
            torch.testing.assert_close(blocks(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3", "gpt_neox"])
def test_rope_none_equals_identity_rotation(family, tiny_checkpoint):
    """`rope="none"` is the HF layer called directly with cos=1, sin=0 (and no mask: eager = bidirectional)."""
    types = getattr(build_tiny_model(family).config, "layer_types", None) or ["full_attention"] * 4
    idx = max(i for i, t in enumerate(types) if t == "full_attention")  # the reference call has no window
    blocks = load_blocks(tiny_checkpoint(family), [idx], rope="none", final_norm="none", attn_implementation="eager")
    layer = blocks.layers[0]
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    extra = (blocks.layer_types[0],) if blocks.rotary_takes_layer_type else ()
    cos, sin = blocks.rotary(x, torch.arange(7)[None], *extra)
    with torch.no_grad():
        ref = layer(x, attention_mask=None, position_embeddings=(torch.ones_like(cos), torch.zeros_like(sin)))
        ours = blocks(x)
        native = load_blocks(tiny_checkpoint(family), [idx], rope="native", final_norm="none")(x)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert not torch.allclose(ours, native, atol=1e-4), "native rotary must change the output"


@pytest.mark.parametrize(("family", "layers"), [("llama", [0, 1, 2]), ("gemma3_text", [1, 3]), ("gpt_neox", [2, 0])])
def test_rope_none_bidirectional_is_permutation_equivariant(family, layers, tiny_checkpoint):
    """With no positions and no mask, attention is a set operation: permuting tokens permutes outputs.
    (Gemma 3's sliding-window layers are local in token order, so only its global layers qualify.)"""
    blocks = load_blocks(tiny_checkpoint(family), layers, rope="none")
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(blocks(x)[:, perm], blocks(x[:, perm]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_padding_never_changes_real_tokens(family, attention, impl, tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint(family), [0, 1], attention=attention, rope="native", attn_implementation=impl)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1, 6, 64, generator=g)
    padded = torch.cat([real, torch.randn(1, 4, 64, generator=g)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    garbage = padded.clone()
    garbage[:, 6:] = 1e4
    with torch.no_grad():
        alone = blocks(real)
        a = blocks(Tokens(padded, mask=mask)).x
        b = blocks(Tokens(garbage, mask=mask)).x
    torch.testing.assert_close(a[:, :6], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(b[:, :6], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(b).all()


def test_tokens_metadata_round_trips(tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint("llama"), [-1])
    pos = torch.rand(2, 17, 2)
    tokens = Tokens(torch.randn(2, 17, 64), pos=pos, grid=(4, 4), num_prefix=1, modality="image")
    with torch.no_grad():
        out = blocks(tokens)
    assert isinstance(out, Tokens)
    assert out.pos is pos and out.grid == (4, 4) and out.num_prefix == 1 and out.modality == "image"
    assert out.x.shape == (2, 17, 64)


def test_sliding_window_layers_use_local_attention(tiny_checkpoint):
    """Mistral's tiny config has sliding_window=4: token 0 must not see token 8 even bidirectionally."""
    blocks = load_blocks(tiny_checkpoint("mistral"), [0], attention="bidirectional")
    assert blocks.layer_types == ["sliding_attention"]
    assert not _first_token_moves_when_last_changes(blocks)
    full = load_blocks(tiny_checkpoint("llama"), [0], attention="bidirectional")
    assert _first_token_moves_when_last_changes(full)


def test_dtype_and_autocast(tiny_checkpoint):
    """bf16 weights, and fp32 weights under bf16 autocast, both match the fp32 forward to a few bf16 ulps of the
    output scale. The input's residual stream is small (x0.1), so the layers' own contribution is many times that
    tolerance: layers that returned their input (or were skipped) cannot pass."""
    folder = tiny_checkpoint("llama")
    blocks = load_blocks(folder, [0, 1], dtype="bfloat16")
    assert blocks.dtype == torch.bfloat16
    x = 0.1 * torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    fp32 = load_blocks(folder, [0, 1])
    with torch.no_grad():
        y = blocks(x)
        ref = fp32(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = fp32(x)
        skipped = fp32.final_norm(x)  # what the blocks would return if both layers were the identity
    assert y.dtype == torch.float32 and z.dtype == torch.float32, "output comes back in the input dtype"
    ulp = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(ref.abs().max().item()))
    tol = 4 * ulp  # measured: bf16 weights ~1.7 ulp, autocast ~0.2 ulp; identity layers ~40 ulp
    assert (skipped - ref).abs().max() > 5 * tol, "the check must be able to tell the layers from the identity"
    torch.testing.assert_close(y, ref, atol=tol, rtol=0)
    torch.testing.assert_close(z, ref, atol=tol, rtol=0)
    assert not torch.equal(y, ref), "bf16 weights must actually compute in bf16"


# ------------------------------------------------------------------------------------------------ soft / post-softmax
SOFT_FAMILIES = ["llama", "gemma3_text", "gpt2", "bert"]


def _soft(folder, layers, impl, causal_impl="pre_softmax", **kw):
    blocks = load_blocks(folder, layers, attention="soft", attn_implementation=impl, **kw)
    blocks.causal_impl = causal_impl
    return blocks


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("family", SOFT_FAMILIES)
def test_soft_end_points_equal_bidirectional_and_causal(family, impl, tiny_checkpoint):
    """r = 1 is bidirectional and r = 0 causal (pre_softmax), on every backend that takes a float mask."""
    if not _supported(family, impl):
        pytest.skip(f"{family} does not support {impl}")
    folder = tiny_checkpoint(family)
    layers = [0, 1]
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    soft = _soft(folder, layers, impl)
    with torch.no_grad():
        bi = load_blocks(folder, layers, attention="bidirectional", attn_implementation=impl)(x)
        ca = load_blocks(folder, layers, attention="causal", attn_implementation=impl)(x)
        soft.set_soft_mask_ratio(1.0)
        torch.testing.assert_close(soft(x), bi, atol=1e-5, rtol=0)
        soft.set_soft_mask_ratio(0.0)
        torch.testing.assert_close(soft(x), ca, atol=1e-5, rtol=0)
        soft.set_soft_mask_ratio(0.5)
        mid = soft(x)
    assert not torch.allclose(mid, bi, atol=1e-4) and not torch.allclose(mid, ca, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "bert", "gpt_neox"])
def test_post_softmax_mult_end_points(family, tiny_checkpoint):
    """post_softmax_mult (eager): r = 1 is bidirectional; r = 0 equals attention="causal" with the same impl and
    differs from the pre-softmax causal mask (it does not renormalise)."""
    folder = tiny_checkpoint(family)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    soft = _soft(folder, [0, 1], "eager", "post_softmax_mult")
    causal_post = load_blocks(folder, [0, 1], attention="causal", attn_implementation="eager")
    causal_post.causal_impl = "post_softmax_mult"
    with torch.no_grad():
        bi = load_blocks(folder, [0, 1], attention="bidirectional", attn_implementation="eager")(x)
        pre = load_blocks(folder, [0, 1], attention="causal", attn_implementation="eager")(x)
        soft.set_soft_mask_ratio(1.0)
        torch.testing.assert_close(soft(x), bi, atol=1e-5, rtol=0)
        soft.set_soft_mask_ratio(0.0)
        torch.testing.assert_close(soft(x), causal_post(x), atol=1e-6, rtol=0)
    assert not torch.allclose(causal_post(x), pre, atol=1e-4)
    assert causal_post.attn_implementation == "eager"


def _llama_layer_by_hand(layer, x, angles=None, weights_mult=None):
    """One tiny-Llama layer (4 query heads, 2 kv heads, head dim 16) written out: pre-norm, q / k / v, optional
    rotation of q and k, softmax over every key (no mask), optional post-softmax weights, o_proj, MLP.

    `angles` ``[B, N, 8]``: channel ``i`` and ``i + 8`` of q and k form one pair, turned as the complex number
    ``q_i + j q_{i+8}`` by ``exp(j * angles[..., i])`` (HF's rotate_half layout)."""
    attn = layer.self_attn
    b, n, _ = x.shape
    h = layer.input_layernorm(x)
    heads = lambda proj: proj(h).view(b, n, -1, 16).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    if angles is not None:
        turn = torch.polar(torch.ones_like(angles, dtype=torch.float64), angles.double())[:, None]  # [B, 1, N, 8]

        def rotate(t):
            c = torch.complex(t[..., :8].double(), t[..., 8:].double()) * turn
            return torch.cat([c.real, c.imag], dim=-1).to(t.dtype)

        q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # 4 query heads, 2 kv heads
    weights = (q @ k.transpose(-2, -1) / 4.0).softmax(-1)  # scale 1 / sqrt(16)
    if weights_mult is not None:
        weights = weights * weights_mult
    o = attn.o_proj((weights @ v).transpose(1, 2).reshape(b, n, -1))
    mid = x + o
    return mid + layer.mlp(layer.post_attention_layernorm(mid))


def test_post_softmax_mult_llama_layer_oracle(tiny_checkpoint):
    """One Llama layer, rope none, by hand: softmax over all keys, times tril, no renormalisation."""
    blocks = load_blocks(
        tiny_checkpoint("llama"), [0], attention="causal", final_norm="none", attn_implementation="eager"
    )
    blocks.causal_impl = "post_softmax_mult"
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _llama_layer_by_hand(blocks.layers[0], x, weights_mult=torch.ones(7, 7).tril())
        torch.testing.assert_close(blocks(x), ref, atol=1e-5, rtol=1e-5)


def test_backends_that_cannot_run_a_mode_raise_clearly(tiny_checkpoint):
    from mmblocks.layers.masks import backend_supports, check_backend

    with pytest.raises(ValueError, match="only eager attention materialises"):
        load_blocks(
            tiny_checkpoint("llama"), [0], attention="causal", attn_implementation="sdpa"
        ).causal_impl = "post_softmax_mult"
    blocks = load_blocks(tiny_checkpoint("llama"), [0], attention="soft", attn_implementation="eager")
    blocks.causal_impl = "post_softmax_mult"
    with pytest.raises(ValueError, match="only eager attention materialises"):
        blocks.set_attn_implementation("sdpa")
    assert blocks.attn_implementation == "eager"
    with pytest.raises(ValueError, match="takes no float mask"):
        check_backend("flash_attention_2", "soft")
    assert backend_supports("flash_attention_2", "causal") and backend_supports("flex_attention", "soft")
    assert not backend_supports("sdpa", "soft", "post_softmax_mult")


# post_softmax_mult runs on eager only (sdpa refuses it: test_backends_that_cannot_run_a_mode_raise_clearly)
@pytest.mark.parametrize(
    ("causal_impl", "impl"), [("pre_softmax", "eager"), ("pre_softmax", "sdpa"), ("post_softmax_mult", "eager")]
)
def test_soft_padding_never_changes_real_tokens(causal_impl, impl, tiny_checkpoint):
    blocks = _soft(tiny_checkpoint("llama"), [0, 1], impl, causal_impl, rope="native")
    blocks.set_soft_mask_ratio(0.3)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1, 6, 64, generator=g)
    padded = torch.cat([real, 1e4 * torch.ones(1, 4, 64)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    with torch.no_grad():
        alone = blocks(real)
        out = blocks(Tokens(padded, mask=mask)).x
    torch.testing.assert_close(out[:, :6], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


def test_advance_soft_masks_drives_llm_blocks_and_r_is_checkpointed(tiny_checkpoint):
    from mmblocks.models import SoftMaskSchedule, advance_soft_masks

    blocks = load_blocks(tiny_checkpoint("llama"), [0], attention="soft", attn_implementation="eager")
    blocks.soft_mask = SoftMaskSchedule("linear", cutoff=2, unit="epochs")
    assert advance_soft_masks(torch.nn.Sequential(blocks), 15, steps_per_epoch=10) == {"0": pytest.approx(0.25)}
    assert float(blocks.soft_mask_ratio) == pytest.approx(0.25)
    state = blocks.state_dict()
    assert "soft_mask_ratio" in state
    fresh = load_blocks(tiny_checkpoint("llama"), [0], attention="soft", attn_implementation="eager")
    fresh.load_state_dict(state)
    assert float(fresh.soft_mask_ratio) == pytest.approx(0.25)
    # the other modes keep their state dict as it was
    assert "soft_mask_ratio" not in load_blocks(tiny_checkpoint("llama"), [0]).state_dict()


def test_soft_without_a_schedule_warns_once(tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint("llama"), [0], attention="soft")
    with pytest.warns(UserWarning, match="without a soft_mask schedule"):
        blocks(torch.randn(1, 4, 64))


# ------------------------------------------------------------------------------------------------ axial rope
def _grid_tokens(batch: int = 2, h: int = 3, w: int = 4, shift=(0.0, 0.0), seed: int = 0, cls: int = 1) -> Tokens:
    from mmblocks.layers.rope import grid_positions

    pos = grid_positions((h, w), num_prefix=cls).expand(batch, -1, -1).clone()
    pos[:, cls:] += torch.tensor(shift)
    x = torch.randn(batch, h * w + cls, 64, generator=torch.Generator().manual_seed(seed))
    return Tokens(x, pos=pos, grid=(h, w), num_prefix=cls, modality="image")


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3", "gpt_neox"])
def test_rope_2d_depends_only_on_relative_positions(family, tiny_checkpoint):
    """Bidirectional + 2-D rope on grid tokens: shifting every position changes nothing; moving them does. (An
    unrotated cls token acts as a token at the origin, so it is left out here.)"""
    blocks = load_blocks(tiny_checkpoint(family), [0, 1], rope="2d", attn_implementation="eager")
    tokens = _grid_tokens(cls=0)
    with torch.no_grad():
        ref = blocks(tokens).x
        shifted = blocks(_grid_tokens(shift=(5.0, -3.0), cls=0)).x
        moved = blocks(Tokens(tokens.x, pos=tokens.pos.flip(-1), grid=(3, 4))).x  # transposed: other offsets
        none = load_blocks(tiny_checkpoint(family), [0, 1], rope="none", attn_implementation="eager")(tokens.x)
    torch.testing.assert_close(shifted, ref, atol=1e-5, rtol=0)
    # small random layers: the attention moves the output by ~1e-3, float noise is ~1e-7
    assert (moved - ref).abs().max() > 1e-4
    assert (none - ref).abs().max() > 1e-4


def _axial_angles_reference(pos: torch.Tensor, dim: int, num_prefix: int = 0, theta: float = 10000.0):
    """VisionLLaMA's axial rotary as documented, written out independently of `mmblocks.layers.rope`: with ``P``
    axes, rotation pair ``i = m * P + a`` turns by ``pos[..., a] * theta ** (-2 * P * m / dim)`` for
    ``m < dim // (2 * P)``; leftover pairs and the prefix (cls) tokens are not turned. ``[B, N, dim // 2]``."""
    b, n, axes = pos.shape
    per_axis = dim // (2 * axes)
    angles = torch.zeros(b, n, dim // 2, dtype=torch.float64)
    for i in range(dim // 2):
        m, a = divmod(i, axes)
        if m < per_axis:
            angles[..., i] = pos[..., a].double() * theta ** (-2.0 * axes * m / dim)
    angles[:, :num_prefix] = 0.0
    return angles


def _grid_coords(*sizes: int) -> torch.Tensor:
    """``[prod(sizes), len(sizes)]`` row-major integer coordinates, by hand."""
    return torch.tensor(list(itertools.product(*(range(s) for s in sizes))), dtype=torch.float32)


def test_axial_angles_reference_is_the_documented_layout():
    """The test's own reference, pinned on hand-computed values (dim 16: 2-D has 4 frequencies per axis)."""
    pos = torch.tensor([[[2.0, 3.0]]])
    angles = _axial_angles_reference(pos, 16)[0, 0]
    expected = [2.0, 3.0, 2 * 10000**-0.25, 3 * 10000**-0.25, 2 * 10000**-0.5, 3 * 10000**-0.5]
    expected += [2 * 10000**-0.75, 3 * 10000**-0.75]
    torch.testing.assert_close(angles, torch.tensor(expected, dtype=torch.float64))
    angles3 = _axial_angles_reference(torch.tensor([[[1.0, 2.0, 3.0]]]), 16)[0, 0]  # 2 per axis, 2 pairs left
    expected3 = [1.0, 2.0, 3.0, 10000 ** (-6 / 16), 2 * 10000 ** (-6 / 16), 3 * 10000 ** (-6 / 16), 0.0, 0.0]
    torch.testing.assert_close(angles3, torch.tensor(expected3, dtype=torch.float64))


def test_rope_2d_matches_a_hand_written_axial_rotary_layer(tiny_checkpoint):
    """rope="2d" on grid tokens with a cls prefix equals the Llama layer written out with the documented axial
    rotation (row / column pairs interleaved, cls unrotated)."""
    blocks = load_blocks(tiny_checkpoint("llama"), [0], rope="2d", final_norm="none", attn_implementation="eager")
    tokens = _grid_tokens()
    with torch.no_grad():
        ours = blocks(tokens).x
        ref = _llama_layer_by_hand(blocks.layers[0], tokens.x, _axial_angles_reference(tokens.pos, 16, 1))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        # the reference is sensitive to the layout: axes swapped, or no rotation at all, are far off
        swapped = _llama_layer_by_hand(blocks.layers[0], tokens.x, _axial_angles_reference(tokens.pos.flip(-1), 16, 1))
        unrotated = _llama_layer_by_hand(blocks.layers[0], tokens.x)
        assert (swapped - ref).abs().max() > 1e-4 and (unrotated - ref).abs().max() > 1e-4
        # the cls (prefix) token is not rotated: alone, it is the unrotated layer
        lone = Tokens(tokens.x[:, :1], pos=tokens.pos[:, :1], num_prefix=1)
        torch.testing.assert_close(
            blocks(lone).x, _llama_layer_by_hand(blocks.layers[0], tokens.x[:, :1]), atol=1e-5, rtol=1e-5
        )


def test_rope_2d_auto_scale_and_3d(tiny_checkpoint):
    """AS2DRoPE: a grid twice the training grid is rotated by halved positions; 3-D rope over (t, row, col)
    equals the hand-written layer with 2 frequencies per axis and the 2 leftover pairs unrotated."""
    folder = tiny_checkpoint("llama")
    scaled = load_blocks(folder, [0], rope="2d", final_norm="none", attn_implementation="eager")
    scaled.rope_train_grid = (3, 4)  # load_blocks does not take it yet
    layer = scaled.layers[0]
    big = _grid_tokens(h=6, w=8)  # twice the training grid: positions are halved
    halved = torch.cat([big.pos[:, :1], big.pos[:, 1:] / 2], dim=1)
    with torch.no_grad():
        ref = _llama_layer_by_hand(layer, big.x, _axial_angles_reference(halved, 16, 1))
        torch.testing.assert_close(scaled(big).x, ref, atol=1e-5, rtol=1e-5)
        unscaled = _llama_layer_by_hand(layer, big.x, _axial_angles_reference(big.pos, 16, 1))
        assert (unscaled - ref).abs().max() > 1e-4, "halving the positions must matter"
    video = load_blocks(folder, [0], rope="3d", final_norm="none", attn_implementation="eager")
    pos = _grid_coords(2, 2, 3).expand(2, -1, -1)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = video(Tokens(x, pos=pos, grid=(2, 2, 3))).x
        ref = _llama_layer_by_hand(video.layers[0], x, _axial_angles_reference(pos, 16))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert (_llama_layer_by_hand(video.layers[0], x) - ref).abs().max() > 1e-4


def test_rope_2d_errors(tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint("llama"), [0], rope="2d")
    with pytest.raises(ValueError, match=r"needs Tokens with pos \[B, N, 2\], got a plain tensor"):
        blocks(torch.randn(1, 5, 64))
    with pytest.raises(ValueError, match=r"needs Tokens with pos \[B, N, 2\]"):
        blocks(Tokens(torch.randn(1, 5, 64), pos=torch.rand(1, 5, 3)))
    with pytest.raises(ValueError, match="positions are absolute"):
        load_blocks(tiny_checkpoint("gpt2"), [0], rope="2d")

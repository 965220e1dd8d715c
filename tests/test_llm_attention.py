"""Attention mode, rotary policy and padding behave as declared, under every backend."""

from __future__ import annotations

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
    blocks = load_blocks(tiny_checkpoint("llama"), [0, 1], dtype="bfloat16")
    assert blocks.dtype == torch.bfloat16
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        y = blocks(x)
    assert y.dtype == torch.float32, "output comes back in the input dtype"
    ref = load_blocks(tiny_checkpoint("llama"), [0, 1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = ref(x)
    torch.testing.assert_close(y, z.float(), atol=0.1, rtol=0.05)

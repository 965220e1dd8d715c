"""Oracle: `LLMBlocks` must reproduce the `transformers` model's own forward, family by family."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, hidden_states
from tiny_configs import CORE_FAMILIES
from transformers import AutoConfig

from mmblocks.llm import get_family, load_blocks
from mmblocks.llm.load import supported_attn_implementations
from tokenizers_mm import Tokens

FAMILY_NAMES = CORE_FAMILIES
TOL = 1e-5


def _mode(model_type: str) -> str:
    return get_family(model_type).default_attention


def _impls(model_type: str) -> list[str]:
    model = build_tiny_model(model_type)
    return [i for i in ("eager", "sdpa") if i in supported_attn_implementations(model.config)]


def _model_behaviour_blocks(folder, family: str, impl: str):
    """Layers 1 and 2 loaded to behave as inside the model: its attention mode, its rotary, no extra norm."""
    return load_blocks(
        folder, [1, 2], attention=_mode(family), rope="native", final_norm="none", attn_implementation=impl
    )


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layers_match_model_forward(family, impl, tiny_checkpoint):
    if impl not in _impls(family):
        pytest.skip(f"{family} does not support {impl} in transformers")
    model = build_tiny_model(family, attn_implementation=impl)
    hs, _ = hidden_states(model)
    blocks = _model_behaviour_blocks(tiny_checkpoint(family), family, impl)
    assert blocks.attn_implementation == impl
    with torch.no_grad():
        out = blocks(hs[1])
    torch.testing.assert_close(out, hs[3], atol=TOL, rtol=0)


def _family_impls() -> list[tuple[str, str]]:
    """Every (family, backend) pair the architecture supports (from its config class, no model built)."""
    pairs = []
    for family in FAMILY_NAMES:
        config = AutoConfig.for_model(family)
        pairs += [(family, i) for i in ("eager", "sdpa") if i in supported_attn_implementations(config)]
    return pairs


@pytest.mark.parametrize(("family", "impl"), _family_impls())
def test_sharded_checkpoint_matches(family, impl, tiny_checkpoint):
    folder = tiny_checkpoint(family, sharded=True)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    model = build_tiny_model(family, attn_implementation=impl)
    hs, _ = hidden_states(model)
    blocks = load_blocks(
        folder, range(1, 3), attention=_mode(family), rope="native", final_norm="none", attn_implementation=impl
    )
    assert blocks.attn_implementation == impl
    with torch.no_grad():
        torch.testing.assert_close(blocks(hs[1]), hs[3], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if get_family(f).final_norm is not None])
def test_last_layer_with_llm_norm_matches_final_hidden_state(family, tiny_checkpoint):
    model = build_tiny_model(family)
    hs, last = hidden_states(model)
    blocks = load_blocks(
        tiny_checkpoint(family),
        [-1],
        attention=_mode(family),
        rope="native",
        final_norm="llm",
        attn_implementation="eager",
    )
    with torch.no_grad():
        torch.testing.assert_close(blocks(hs[-2]), last, atol=TOL, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "family",
    ["llama", "qwen2", "gemma3_text", "gpt2", "opt", "gpt_neox", "bert", "mixtral", "bloom", "falcon", "mpt"],
)
def test_padding_mask_matches_model_forward(family, impl, tiny_checkpoint):
    """Right padding through `Tokens.mask` equals the model's own `attention_mask` on the real tokens."""
    if impl not in _impls(family):
        pytest.skip(f"{family} does not support {impl}")
    model = build_tiny_model(family, attn_implementation=impl)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    hs, _ = hidden_states(model, attention_mask=mask.long())
    blocks = _model_behaviour_blocks(tiny_checkpoint(family), family, impl)
    with torch.no_grad():
        out = blocks(Tokens(hs[1], mask=mask, modality="text"))
    assert isinstance(out, Tokens) and out.mask is mask
    torch.testing.assert_close(out.x[mask], hs[3][mask], atol=TOL, rtol=0)
    assert torch.all(out.x[~mask] == 0), "padded positions are zeroed"

"""Oracle over every causal-LM architecture `transformers` registers: discovered layers reproduce the model's forward.

For each `model_type` in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, a tiny model (`mmblocks.llm.tiny_config`) is built
with real random weights moved off their init, saved with `save_pretrained` (plain and sharded), and two consecutive
attention layers ``[i, i + 1]`` loaded with `load_blocks` must map the model's own ``hidden_states[i]`` to
``hidden_states[i + 2]`` (eager and SDPA where the family supports it); the last layer with ``final_norm="llm"``
must give the model's final hidden state. Architectures are skipped only with a reason in the test output:
`transformers` itself cannot build or run them from a tiny config here, or they have no attention layer.
`KNOWN_FAILURES` lists the architectures whose layers mmblocks does not run yet, each with what goes wrong;
they are strict xfails, so one that starts passing must be moved out of the list.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mmblocks.llm import discover, load_blocks, tiny_config
from mmblocks.llm.discovery import build_meta_model, is_attention_type, iter_causal_lm_types
from mmblocks.llm.load import supported_attn_implementations
from mmblocks.llm.survey import attention_pair
from tokenizers_mm import Tokens

pytestmark = pytest.mark.families
TOL = 1e-4  # absolute, plus RTOL: the weights moved off their init give hidden states up to ~1e3
RTOL = 1e-5
MAX_PARAMS = 30e6

#: architectures mmblocks does not run yet, with what happens (strict xfail: a fix must remove the entry)
KNOWN_FAILURES: dict[str, str] = {
    "lara_mini": "hidden states differ by 3e-3 (MoE routing state outside the layers)",
    "xlm": "several parallel ModuleLists (attentions, ffns, norms) instead of a layer class: needs an entry",
    "openai-gpt": "its layers take the attention mask in a legacy format",
    "prophetnet": "its decoder layers need n-gram streams the model builds",
    "blenderbot": "its causal-LM model reports hidden states the layers cannot be aligned with",
    "hrm_text": "two layer stacks (H and L modules) that the model alternates: discovery cannot pick one",
    "blt": "four layer stacks (local encoder / global / local decoder / patcher): discovery cannot pick one",
    "kimi_linear": "its attention layers need routing state from the model",
    "deepseek_v4": "hyper-connections: the model carries 4 residual streams between layers ([B, N, 4, D]), not one",
    "hy_v4": "hyper-connections: the model carries 4 residual streams between layers ([B, N, 4, D]), not one",
    "gemma4": "per-layer embeddings (PLE): every layer also reads an embedding of the token ids, which modality "
    "tokens do not have",
    "gemma4_text": "per-layer embeddings (PLE): every layer also reads an embedding of the token ids, which modality "
    "tokens do not have",
    "gemma3n_text": "AltUp: the model carries several hidden-state streams between layers ([4, B, N, D]) and "
    "per-layer embeddings of the token ids",
    "rwkv": "RWKV's 'attention' is a recurrent time-mix that carries state; no attention mask or mode applies",
    "big_bird": "block-sparse attention needs a length that is a multiple of its block size; the model itself falls "
    "back to full attention for short inputs, mmblocks does not",
    "mllama": "cross-attention layers sit between the self-attention layers; the model skips them without image "
    "states, the loaded stack runs them",
    "cpmant": "its layers need a position bias the model builds (needs an entry)",
    "longcat_flash": "its layers carry two attention sub-layers with their own rotary split",
    "xmod": "its layers need a language id (needs an entry)",
}


@dataclass
class Case:
    model_type: str
    folder: Path
    sharded: Path
    hidden: dict[str, tuple]  # impl -> (hidden_states, last)
    pair: list[int]
    mode: str
    impls: list[str]
    final_norm: bool


@functools.cache
def _case(model_type: str, root: Path) -> Case | str:
    """Build, perturb, save and run the tiny model once per architecture; a string is the reason to skip."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        config = tiny_config(model_type)
        meta = build_meta_model(config)
    except Exception as err:  # transformers' own validation refuses a small config
        return f"transformers cannot build a tiny {model_type}: {type(err).__name__}: {str(err)[:120]}"
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMS:
        return f"the tiny config still has {n / 1e6:.0f}M parameters (sub-configs transformers keeps full size)"
    pair = attention_pair(meta.config)
    if pair is None:
        return "no attention layer in the tiny config (state-space / recurrent layers only)"
    impls = [i for i in ("eager", "sdpa") if i in supported_attn_implementations(meta)]
    spec = discover(meta.config, meta)  # its own error is a failure (or a listed known one), never a skip
    hidden = {}
    try:
        torch.manual_seed(0)
        meta.config._attn_implementation = "eager"
        model = type(meta)._from_config(meta.config).eval()
        with torch.no_grad():
            # far from init: norms no longer 1, biases no longer 0 (fixed sinusoidal position tables stay as built)
            for name, p in model.named_parameters():
                if "embed_positions" not in name:
                    p.mul_(-1.5).add_(0.05)
        folder, sharded = root / model_type, root / f"{model_type}-sharded"
        model.save_pretrained(folder)
        model.save_pretrained(sharded, max_shard_size="50KB")
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
        for impl in impls:
            model.set_attn_implementation(impl)
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
                # the final hidden state (after the final norm) is the decoder's own last_hidden_state: some
                # families' hidden_states[-1] is the last layer's output before that norm
                decoder = model.get_submodule(spec.decoder) if spec.decoder else None
                last = getattr(decoder(input_ids=ids), "last_hidden_state", None) if decoder is not None else None
            hidden[impl] = (out.hidden_states, out.hidden_states[-1] if last is None else last)
    except Exception as err:
        return f"transformers cannot run a tiny {model_type} on CPU: {type(err).__name__}: {str(err)[:120]}"
    return Case(model_type, folder, sharded, hidden, pair, spec.default_attention, impls, spec.final_norm is not None)


@pytest.fixture(scope="session")
def case_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def _check(case: Case, folder: Path, impl: str) -> None:
    hs, _ = case.hidden[impl]
    a, b = case.pair[0], case.pair[-1] + 1
    blocks = load_blocks(
        folder, case.pair, attention=case.mode, rope="native", final_norm="none", attn_implementation=impl
    )
    assert blocks.attn_implementation == impl
    with torch.no_grad():
        torch.testing.assert_close(blocks(hs[a]), hs[b], atol=TOL, rtol=RTOL)


TYPES = iter_causal_lm_types()


def _xfail_strict(model_type: str):
    marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[model_type], strict=True)] if model_type in KNOWN_FAILURES else []
    return pytest.param(model_type, marks=marks, id=model_type)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", [_xfail_strict(t) for t in TYPES])
def test_discovered_layers_match_model_forward(model_type, impl, case_root):
    case = _case(model_type, case_root)
    if isinstance(case, str):
        pytest.skip(case)
    if impl not in case.impls:
        pytest.skip(f"{model_type} does not support {impl} in transformers")
    _check(case, case.folder, impl)


@pytest.mark.parametrize("model_type", [_xfail_strict(t) for t in TYPES])
def test_discovered_layers_from_sharded_checkpoint(model_type, case_root):
    case = _case(model_type, case_root)
    if isinstance(case, str):
        pytest.skip(case)
    assert len(list(case.sharded.glob("model-*-of-*.safetensors"))) > 1
    _check(case, case.sharded, "eager")


@pytest.mark.parametrize("model_type", [_xfail_strict(t) for t in TYPES])
def test_last_layer_with_llm_norm_is_the_final_hidden_state(model_type, case_root):
    case = _case(model_type, case_root)
    if isinstance(case, str):
        pytest.skip(case)
    if not case.final_norm:
        pytest.skip(f"{model_type} has no final norm")
    hs, last = case.hidden["eager"]
    n = len(hs) - 1
    kinds = getattr(build_meta_model(tiny_config(model_type)).config.get_text_config(), "layer_types", None)
    if kinds and not is_attention_type(kinds[-1]):
        pytest.skip(f"the last layer of the tiny {model_type} is a {kinds[-1]} layer")
    blocks = load_blocks(
        case.folder, [-1], attention=case.mode, rope="native", final_norm="llm", attn_implementation="eager"
    )
    with torch.no_grad():
        torch.testing.assert_close(blocks(hs[n - 1]), last, atol=TOL, rtol=RTOL)


#: the known failures whose layers cannot run at all here (the others run, but differ from their model)
CANNOT_RUN = {
    *("big_bird", "cpmant", "deepseek_v4", "hrm_text", "hy_v4", "openai-gpt", "prophetnet", "rwkv", "xlm"),
    *("gemma4", "gemma4_text", "gemma3n_text"),
}


def _runs(model_type: str):
    marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[model_type], strict=True)] if model_type in CANNOT_RUN else []
    return pytest.param(model_type, marks=marks, id=model_type)


@pytest.mark.parametrize("model_type", [_runs(t) for t in TYPES])
def test_bidirectional_padding_mask_hides_padded_keys(model_type, case_root):
    """attention="bidirectional" with a padding mask: what sits at padded positions never reaches the real tokens."""
    case = _case(model_type, case_root)
    if isinstance(case, str):
        pytest.skip(case)
    blocks = load_blocks(case.folder, case.pair, attention="bidirectional", rope="none").eval()
    width = blocks.hidden_size
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, width, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    noisy = x.clone()
    noisy[1, 6:] = 100 * torch.randn(4, width, generator=g)
    with torch.no_grad():
        a = blocks(Tokens(x, mask=mask, modality="text")).x
        b = blocks(Tokens(noisy, mask=mask, modality="text")).x
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[mask], b[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", [_runs(t) for t in TYPES])
def test_lora_on_every_linear_trains(model_type, case_root):
    """tune="lora" on all linears (and fused expert tensors) opens only LoRA weights, and the gradient reaches them."""
    case = _case(model_type, case_root)
    if isinstance(case, str):
        pytest.skip(case)
    blocks = load_blocks(case.folder, case.pair[:1], tune="lora", target="all-linear", r=2).train()
    trainable = dict((n, p) for n, p in blocks.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.randn(2, 6, blocks.hidden_size, generator=torch.Generator().manual_seed(4))
    out = blocks(x)
    (out.square().mean() + (blocks.aux_loss if isinstance(blocks.aux_loss, torch.Tensor) else 0.0)).backward()
    # B starts at zero, so at the first step only the B matrices receive a gradient
    reached = [n for n, p in trainable.items() if "lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0]
    assert reached, f"no LoRA B matrix received a gradient in {model_type}"


@pytest.mark.parametrize("model_type", [_runs(t) if t not in ("cpmant", "rwkv") else t for t in TYPES])
def test_expand_is_the_identity_or_refused_with_a_reason(model_type, case_root):
    """tune="expand" either adds copies that leave the stack's output unchanged at init (LLaMA Pro), or refuses,
    saying what it measured."""
    case = _case(model_type, case_root)
    if isinstance(case, str):
        pytest.skip(case)
    base = load_blocks(case.folder, case.pair[:1]).eval()
    try:
        expanded = load_blocks(case.folder, case.pair[:1], tune="expand").eval()
    except ValueError as err:
        assert "tune='expand'" in str(err) and ("pre-norm" in str(err) or "impossible" in str(err))
        return
    assert expanded.num_layers == 2 and expanded.layer_indices[1] is None
    x = torch.randn(2, 6, base.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(expanded(x), base(x), atol=1e-5, rtol=1e-5)

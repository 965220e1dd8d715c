"""Shared fixtures: tiny `transformers` models of every family, built in code and saved to disk once."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_configs import LIBRARY_TINY, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from mmblocks.data import make_dataset
from mmblocks.llm import get_family
from mmblocks.llm import tiny_config as library_tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def build_tiny_model(model_type: str, attn_implementation: str = "eager", seed: int = 0) -> PreTrainedModel:
    """A randomly initialised 4-layer model of `model_type` (BERT: the encoder, others: the causal LM)."""
    torch.manual_seed(seed)
    if model_type in LIBRARY_TINY:
        config = library_tiny_config(model_type)
    else:
        config = AutoConfig.for_model(model_type, **tiny_config(model_type))
    config._attn_implementation = attn_implementation
    cls = AutoModel if get_family(model_type).encoder else AutoModelForCausalLM
    return cls.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_checkpoint(model_type, sharded=False)` -> a folder written by `save_pretrained` (cached)."""
    cache: dict[tuple[str, bool], Path] = {}

    def make(model_type: str, sharded: bool = False) -> Path:
        key = (model_type, sharded)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{model_type}{'-sharded' if sharded else ''}")
            model = build_tiny_model(model_type)
            model.save_pretrained(folder, max_shard_size="60KB" if sharded else "5GB")
            cache[key] = folder
        return cache[key]

    return make


def hidden_states(model: PreTrainedModel, seq_len: int = 12, batch: int = 2, seed: int = 1, attention_mask=None):
    """The model's own `hidden_states` and final hidden state for random token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=g)
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, output_hidden_states=True)
    last = getattr(out, "last_hidden_state", None)
    if last is None:
        last = out.hidden_states[-1]
    return out.hidden_states, last


#: Small versions of the offline datasets (the same makers, fewer samples) for recipes trained a few steps in tests.
SMALL_DATASETS: dict[str, dict] = {
    "digits": {},
    "textures": {"crops_per_class": (4, 2, 2)},
    "meshes": {"samples_per_class": (4, 2, 2)},
    "keywords": {"clips_per_word": (3, 1, 1), "words": ("yes", "no", "up", "down")},
    "moving-digits": {"clips_per_class": (3, 1, 1)},
    "sentences": {"clips": (8, 2, 2)},
    "shapes": {"scenes": (8, 2, 2)},
    "moving-digit-captions": {"clips_per_class": (1, 1, 1)},
}
SPOKEN = ("keywords", "sentences")


@pytest.fixture(scope="session")
def small_datasets(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`small_datasets(name)` -> the folder of a small `name` dataset (`SMALL_DATASETS`), made once per session;
    the spoken ones skip where espeak-ng is missing."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            if name in SPOKEN and shutil.which("espeak-ng") is None:
                pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
            made[name] = tmp_path_factory.mktemp(name)
            make_dataset(name, made[name], seed=0, progress=False, **SMALL_DATASETS[name])
        return made[name]

    return get


@pytest.fixture(scope="session")
def digit_shards(small_datasets: Callable[[str], Path]) -> Path:
    """The `digits` shards (scikit-learn's 1797 real 8x8 digits), made once per session."""
    return small_datasets("digits")

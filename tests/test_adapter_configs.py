"""The adapter comparison configs: a frozen tower from a checkpoint, the adapter swapped by one key, token budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmblocks.builders import build_encoder
from mmblocks.config import load_config
from mmblocks.train import trainable_state_dict

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "image" / "adapters").glob("*.yaml"))
TOKENS = {"linear": 65, "mlp": 65, "pool": 16, "pixel_shuffle": 16, "qformer": 16, "perceiver": 16}


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    torch.manual_seed(0)
    encoder = build_encoder(REPO / "configs/image/textures_tower_vit_tiny_p4.yaml", num_classes=17, verbose=False)
    folder = tmp_path_factory.mktemp("tower")
    save_file({k: v.contiguous() for k, v in trainable_state_dict(encoder).items()}, folder / "model.safetensors")
    return encoder, folder


def test_every_adapter_has_a_config():
    assert {p.stem.removeprefix("textures_") for p in CONFIGS} == set(TOKENS)


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_adapter_config_freezes_the_tower_and_matches_its_token_budget(config, tower):
    trained, folder = tower
    cfg = load_config(config, [f"model.init.checkpoint={folder}"])
    encoder = build_encoder(cfg, num_classes=17, verbose=False)
    for name, p in encoder.named_parameters():
        assert p.requires_grad == name.startswith(("llm_stage.adapter", "head.")), name
        if name.startswith(("tokenizer.", "backbone.")):
            torch.testing.assert_close(p, dict(trained.named_parameters())[name])
    seen = {}
    encoder.llm_stage.blocks.register_forward_hook(lambda m, args, out: seen.update(n=out.x.shape[1]))
    logits = encoder(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 17) and seen["n"] == TOKENS[cfg["model"]["adapter_in"]["name"]]

"""`model.adapter_in.init_rms`: the adapter's output is rescaled on the first training batch to the RMS of the LLM's
own hidden states (or a given number), once, never again on resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from data_helpers import short_run
from safetensors.torch import load_file

from adapters import create_adapter
from mmblocks.analysis import text_hidden_states, text_rms
from mmblocks.config import ConfigError
from mmblocks.llm import load_blocks
from mmblocks.models import LLMStage
from mmblocks.recipes import train
from mmblocks.train import read_metrics
from tokenizers_mm import Tokens

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "image" / "digits_vit_tiny_smollm2.yaml"
TINY = ["data.image_size=16", "model.backbone.img_size=16", "model.backbone.patch_size=4", "model.backbone.depth=1"]
ADAPTER_KWARGS = {"frame_stack": {"k": 2}, "pixel_shuffle": {"scale": 2}, "pool": {"grid_out": (2, 2)}}


@pytest.mark.parametrize("name", ["linear", "mlp", "pool", "pixel_shuffle", "qformer", "perceiver", "frame_stack"])
def test_calibrate_gives_the_target_rms_for_every_adapter(name, tiny_checkpoint):
    torch.manual_seed(0)
    blocks = load_blocks(tiny_checkpoint("llama"), [0])
    adapter = create_adapter(name, 32, 64, **ADAPTER_KWARGS.get(name, {}))
    stage = LLMStage(adapter, blocks, create_adapter("linear", 64, 32), adapter_in_rms=7.0)
    assert stage.needs_calibration
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(1, 16, 2)
    tokens = Tokens(
        x=torch.randn(3, 16, 32), mask=torch.ones(3, 16, dtype=torch.bool), pos=grid.expand(3, -1, -1), grid=(4, 4)
    )
    factor = stage.calibrate(tokens)
    assert factor > 0
    with torch.no_grad():
        out = stage.adapter_in(tokens)
    x = out.x if isinstance(out, Tokens) else out
    real = x[out.mask] if isinstance(out, Tokens) and out.mask is not None else x.reshape(-1, 64)
    assert float(real.pow(2).mean().sqrt()) == pytest.approx(7.0, rel=1e-3)


def test_text_rms_is_the_lm_hidden_state_rms_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBLOCKS_CACHE", str(tmp_path))
    rms = text_rms("smollm2-135m", -1)
    assert rms == pytest.approx(float(text_hidden_states("smollm2-135m", -1).pow(2).mean().sqrt()), rel=1e-6)
    assert (tmp_path / "text_rms.json").is_file()
    assert text_rms("smollm2-135m", 29) == rms  # -1 is layer 29 of 30: one entry
    with pytest.raises(ValueError, match="no pretrained weights"):
        text_rms("random:llama", -1)


def test_a_run_with_init_rms_text_feeds_the_block_states_of_its_own_scale(tmp_path, small_datasets, monkeypatch):
    monkeypatch.setenv("MMBLOCKS_CACHE", str(tmp_path / "cache"))
    root = small_datasets("digits")
    common = [*TINY, "train.instrument_every=1", "train.checkpoint_every=1"]
    train(RECIPE, [*common, "model.adapter_in.init_rms=text", *short_run(root, tmp_path / "run", steps=3)])
    rec = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "stages"]
    target = text_rms("smollm2-135m", -1)
    # the first step runs on the calibrated adapter; the others stay near it
    assert rec[0]["rms.adapter_in"] == pytest.approx(target, rel=0.02)
    assert 0.2 < rec[0]["update.llm"] < 2  # not swamped (88x without, test_train_instrument)
    # a resume from step 2 does not calibrate again: it ends where the uninterrupted run ended
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000003")
    (resumed / "checkpoints" / "latest").write_text("step-00000002")

    def refuse(self, tokens):
        raise AssertionError("a resumed run must not calibrate")

    monkeypatch.setattr(LLMStage, "calibrate", refuse)
    train(RECIPE, [*common, "model.adapter_in.init_rms=text", *short_run(root, resumed, steps=3)], resume=True)
    a = load_file(tmp_path / "run" / "checkpoints" / "step-00000003" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step-00000003" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)


def test_init_rms_text_needs_pretrained_weights(tmp_path, small_datasets):
    with pytest.raises(ConfigError, match="init_rms"):
        train(
            RECIPE,
            [
                *TINY,
                "model.llm.source=random:llama",
                "model.llm.config_overrides={hidden_size: 64, "
                "intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}",
                "model.adapter_in.init_rms=text",
                *short_run(small_datasets("digits"), tmp_path),
            ],
        )


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"init": {"checkpoint": "some/run", "stages": ["backbone", "llm_stage"]}}, "model.init loads a trained"),
        ({"freeze": ["llm_stage"]}, "model.freeze holds llm_stage"),
    ],
)
def test_init_rms_refuses_an_adapter_it_must_not_rescale(extra, match):
    from mmblocks.builders import build_encoder

    cfg = {
        "model": {
            "backbone": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1},
            "llm": {"enabled": True, "source": "smollm2-135m"},
            "adapter_in": {"name": "linear", "init_rms": 3.0},
            "num_classes": 10,
            **extra,
        },
        "data": {"channels": 1},
    }
    with pytest.raises(ConfigError, match=match):
        build_encoder(cfg, verbose=False)


def test_a_residual_stage_starts_as_the_baseline_and_learns():
    """`model.stage_residual`: tokens + stage(tokens) with adapter_out zero-initialised; with the pairing of
    `build_encoder`, the encoder at init gives exactly its baseline's logits."""
    from mmblocks.builders import build_encoder
    from mmblocks.train import seed_everything

    def encoder(llm: bool):
        seed_everything(3)
        model = {
            "backbone": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1},
            "llm": {"enabled": llm, "source": "smollm2-135m"},
            "stage_residual": llm,
            "num_classes": 10,
        }
        return build_encoder({"model": model, "data": {"channels": 1}}, verbose=False).eval()

    base, res = encoder(False), encoder(True)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res(x), base(x))
    res.train()
    res(x).square().sum().backward()
    assert res.llm_stage.adapter_out.proj.weight.grad.abs().sum() > 0

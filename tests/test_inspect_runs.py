"""`blocks analyze` and `blocks maps` on a trained run: the captured tokens are the encoder's own, the layer scan
measures what it says, and the foreground AUC of activation maps behaves on masks we know."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_helpers import short_run

from mmblocks.analysis import block_influence, layer_outputs, linear_cka, update_rms
from mmblocks.analysis.activation_maps import foreground_auc, patch_foreground, token_norm_maps
from mmblocks.analysis.block_scan import rank_layers, scan_layers
from mmblocks.cli import main
from mmblocks.inspect_runs import capture_run
from mmblocks.llm import load_blocks
from mmblocks.recipes import train
from tokenizers_mm import Tokens

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "image" / "digits_vit_tiny_smollm2.yaml"
TINY = ["model.backbone.depth=1"]


def test_patch_foreground_and_auc_on_known_masks():
    img = torch.zeros(2, 1, 8, 8)
    img[0, :, 2:4, 4:8] = 1.0  # two patches of 4x4... covered partly
    img[1, :, 0:4, 0:4] = 1.0
    img[1, :, 0, :] = 0.0  # keep a background border
    fg = patch_foreground(img, (2, 2))
    assert fg[0].tolist() == [[False, True], [False, False]]
    assert fg[1].tolist() == [[True, False], [False, False]]
    maps = torch.tensor([[[0.1, 0.9], [0.2, 0.3]], [[0.1, 0.9], [0.2, 0.3]]])
    # image 0: the object token outranks every other (AUC 1); image 1: it is the lowest (AUC 0)
    assert foreground_auc(maps[:1], fg[:1]) == pytest.approx(1.0)
    assert foreground_auc(maps[1:], fg[1:]) == pytest.approx(0.0)
    assert foreground_auc(maps, fg) == pytest.approx(0.5)
    tokens = Tokens(x=torch.randn(2, 5, 3), grid=(2, 2), num_prefix=1)
    norms = token_norm_maps(tokens)
    torch.testing.assert_close(norms, tokens.x[:, 1:].norm(dim=-1).reshape(2, 2, 2))


def test_scan_layers_measures_each_layer(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    g = torch.Generator().manual_seed(0)
    tokens = Tokens(x=torch.randn(20, 6, 64, generator=g) * 3)
    final = torch.randn(20, 16, generator=g)
    rows = scan_layers(path, tokens, final, layers=[0, -1])
    assert [r["layer"] for r in rows] == [0, 3]
    for row in rows:
        blocks = load_blocks(path, [row["layer"]])
        y = layer_outputs(blocks, tokens.x)
        assert row["update_rms"] == pytest.approx(update_rms(blocks, tokens.x), rel=1e-5)
        assert row["block_influence"] == pytest.approx(block_influence(tokens.x, y), rel=1e-5)
        assert row["cka_final"] == pytest.approx(linear_cka(y.mean(1), final), rel=1e-5)
        assert row["cka_input"] == pytest.approx(linear_cka(y.mean(1), tokens.x.mean(1)), rel=1e-5)
    ranked, _ = rank_layers([{**rows[0], "update_rms": 5.0, "cka_input": 0.9}, {**rows[1], "update_rms": 0.5}])
    assert ranked == [3]  # a layer that swamps its input is tried last
    ranked, why = rank_layers([{**rows[0], "update_rms": 5.0}, {**rows[1], "update_rms": 3.0}])
    assert ranked == [3, 0] and "init_rms" in why


@pytest.mark.slow
def test_analyze_and_maps_on_a_trained_digits_run(tmp_path, small_datasets):
    root = small_datasets("digits")
    frozen, base = tmp_path / "frozen", tmp_path / "baseline"
    train(RECIPE, [*TINY, *short_run(root, frozen, steps=3, batch_size=16)])
    train(RECIPE, [*TINY, "model.llm.enabled=false", *short_run(root, base, steps=3, batch_size=16)])
    _, captured = capture_run(frozen, samples=40)
    assert captured.inputs.shape[0] == 40 and captured.pooled.shape == (40, 192)
    assert captured.tokens["llm_in"].x.shape[-1] == 576 and captured.tokens["before"].x.shape[-1] == 192
    assert captured.tokens["before"].grid == (8, 8)
    assert main(["blocks", "analyze", "--checkpoint", str(frozen), "--layers=-1,-2", "--samples", "40"]) == 0
    report = (frozen / "analysis" / "blocks.md").read_text()
    assert "| 29 (used) |" in report and "Layers to try first" in report
    assert (frozen / "analysis" / "blocks.png").stat().st_size > 1000
    out = tmp_path / "maps"
    args = ["blocks", "maps", str(base), str(frozen), "--names", "baseline,frozen", "--samples", "40"]
    assert main([*args, "--out", str(out)]) == 0
    text = (out / "maps.md").read_text()
    assert "| baseline | — | 0." in text and "| frozen | 0." in text  # a baseline has no "before"
    assert (out / "maps.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["blocks", "analyze"])  # --checkpoint is required
    assert main(["blocks", "analyze", "--checkpoint", str(base)]) == 2  # no LLM stage: a clear error

"""Every pretraining recipe (configs/pretrain) trains a few steps end to end, as written, on a small version of its
dataset, and reports its reconstruction figures and pictures on the test split; the masked encoder sees only the
visible tokens, and evaluation scores every checkpoint on the same masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_helpers import short_run

from mmblocks.builders import build_encoder
from mmblocks.config import load_config
from mmblocks.recipes import build_trainer
from mmblocks.tasks import ReconstructionTask

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs" / "pretrain").glob("*.yaml"))
FIGURES = {
    "pixels": {"psnr_hidden", "psnr_hidden_fill"},
    "points": {"chamfer_l1", "chamfer_l2_centre"},
    "motion": {"epe", "epe_zero", "psnr", "psnr_codec", "psnr_still", "codebook_usage", "perplexity"},
    "waveform": {"loss_fill", "spectral_convergence", "spectral_convergence_vocoder"},
}

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_and_reports_reconstructions(recipe, small_datasets, tmp_path):
    cfg = load_config(REPO / recipe)
    root = small_datasets(cfg["data"]["dataset"])
    out = tmp_path / "run"
    summary = build_trainer(REPO / recipe, [*short_run(root, out, batch_size=4), "data.val_split=null"]).fit()
    assert summary["steps"] == 2
    test = summary["test"]
    kind = cfg["model"]["head"]["detokenizer"]
    assert {"loss", *FIGURES[kind]} <= set(test) and all(v == v for v in test.values())
    assert (out / "report" / "reconstructions_test.png").stat().st_size > 1000
    assert "Reconstructions (test)" in (out / "report" / "report.md").read_text()
    json.dumps(summary)
    if kind == "motion":  # the codec's own motion renders the clip better than no motion at all
        assert test["psnr_codec"] > test["psnr_still"] and 0 < test["codebook_usage"] <= 1
    if cfg["model"]["head"].get("codebook_size"):
        assert 0 < test["codebook_usage"] <= 1 and test["perplexity"] >= 1
    if kind == "waveform":  # the report links playable audio; Griffin-Lim of the true fbank keeps the speech
        assert len(list((out / "report").glob("audio_test_*_reconstruction.flac"))) >= 1
        assert test["spectral_convergence_vocoder"] < 0.6


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_masked_encoder_sees_only_the_visible_tokens(recipe, small_datasets):
    """Hidden tokens cannot leak: the prediction of every token is unchanged when a hidden token's input changes
    (pixels: a hidden patch's pixels; the mask drawn from the same generator seed)."""
    cfg = load_config(REPO / recipe)
    if cfg["model"]["head"]["detokenizer"] != "pixels" or not cfg["task"]["mask_ratio"]:
        pytest.skip("masked pixels only (a point's group depends on its neighbours; a VQ tokenizer hides none)")
    torch.manual_seed(0)
    task = ReconstructionTask(mask_ratio=cfg["task"]["mask_ratio"])
    model = build_encoder(cfg, task=task, verbose=False).eval()
    size, p = cfg["data"]["image_size"], model.tokenizer.patch_embed.patch_size[0]
    images = torch.randn(2, cfg["data"]["channels"], size, size)
    with torch.no_grad():
        out = model(images, mask_ratio=task.mask_ratio, mask_generator=torch.Generator().manual_seed(1))
        hidden = out.masking.hidden
        idx = int(hidden[0].nonzero()[0])
        r, c = divmod(idx, size // p)
        changed = images.clone()
        changed[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 5.0
        again = model(changed, mask_ratio=task.mask_ratio, mask_generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.masking.ids_keep, out.masking.ids_keep)
    torch.testing.assert_close(again.pred, out.pred)
    # and a visible patch's change does reach the predictions
    vis = int((~hidden[0]).nonzero()[0])
    r, c = divmod(vis, size // p)
    changed = images.clone()
    changed[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 5.0
    with torch.no_grad():
        third = model(changed, mask_ratio=task.mask_ratio, mask_generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(third.pred[0], out.pred[0])

"""`ReconstructionHead` (a detokenizer as a head) and `ReconstructionTask`: geometry read from the tokenizer, the
encoder's masking handed to the decoder in the decoder's own order, the VQ bottleneck of the motion target."""

from __future__ import annotations

import pytest
import torch

from mmblocks.heads import ReconstructionHead, create_head
from mmblocks.tasks import ReconstructionTask
from tokenizers_mm.detokenizers import keep_tokens, random_masking, select_visible
from tokenizers_mm.image import ImagePatches
from tokenizers_mm.motion import MotionTokens
from tokenizers_mm.points import PointGroups, group_points


def test_pixels_geometry_comes_from_the_tokenizer():
    tok = ImagePatches(img_size=(16, 24), patch_size=4, in_chans=1, embed_dim=16)
    head = create_head("reconstruction", 16, decoder_dim=16, depth=1, num_heads=2, tokenizer=tok)
    dec = head.detokenizer
    assert (dec.patch_size, dec.in_chans, dec.grid_size) == (4, 1, (4, 6))
    with pytest.raises(ValueError, match="image_patches tokenizer"):
        create_head("reconstruction", 16, tokenizer=PointGroups(num_groups=4, group_size=4, embed_dim=16))


def test_points_head_hands_visible_tokens_to_the_decoder_in_group_order():
    """The encoder keeps the visible groups in its noise order; the head must give the decoder exactly what Point-MAE
    gives it (`select_visible`, group order), and score the loss against the tokenizer's own groups."""
    torch.manual_seed(0)
    tok = PointGroups(num_groups=8, group_size=4, embed_dim=16, class_token=True)
    head = ReconstructionHead(16, "points", decoder_dim=16, depth=1, num_heads=2, tokenizer=tok).eval()
    points = torch.randn(2, 64, 3)
    tokens = tok(points)
    m = random_masking(2, 8, 0.5, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(m.ids_keep.sort(1).values, m.ids_keep)  # the noise order really differs
    with torch.no_grad():
        out = head(keep_tokens(tokens, m.ids_keep), masking=m, target=points)
        groups, centers, _ = group_points(points, 8, 4)
        ref = head.detokenizer(select_visible(tokens, m.hidden), centers, m.hidden)
    torch.testing.assert_close(out.pred, ref)
    torch.testing.assert_close(out.centers, centers)
    torch.testing.assert_close(out.loss, head.detokenizer.loss(ref, groups[..., :3], m.hidden))


def test_motion_head_with_vq_reports_codes_and_adds_the_commitment_loss():
    torch.manual_seed(0)
    tok = MotionTokens(embed_dim=32, patch_size=1, t_patch=2, source="codec", img_size=32, num_frames=8)
    head = ReconstructionHead(
        32, "motion", decoder_dim=16, depth=1, num_heads=2, codebook_size=8, code_dim=4, tokenizer=tok
    )
    field = torch.randint(-3, 4, (2, 7, 2, 2, 2)).float()
    tokens = tok(motion=field)
    out = head(tokens, target=field)
    assert out.pred.shape == field.shape
    assert out.codes.shape == (2, tokens.num_tokens) and int(out.codes.min()) >= 0 and int(out.codes.max()) < 8
    field_loss = head.detokenizer.loss(out.pred, field)
    assert out.loss.item() > field_loss.item()  # + the commitment term
    out.loss.backward()
    assert head.pre_vq.weight.grad is not None and head.pre_vq.weight.grad.abs().sum() > 0  # straight through
    plain = ReconstructionHead(32, "motion", decoder_dim=16, depth=1, num_heads=2, tokenizer=tok)
    assert plain.vq is None and plain(tokens, target=field).codes is None
    with pytest.raises(ValueError, match="no masking"):
        plain(tokens, masking=random_masking(2, tokens.num_tokens, 0.5), target=field)


def test_task_checks_the_mask_ratio_against_the_target():
    tok = ImagePatches(img_size=16, patch_size=4, embed_dim=16)
    with pytest.raises(ValueError, match="must be > 0"):
        ReconstructionTask(mask_ratio=0.0).build_head(16, tokenizer=tok, decoder_dim=16, depth=1, num_heads=2)
    motion = MotionTokens(embed_dim=16, patch_size=1, t_patch=2, source="codec")
    with pytest.raises(ValueError, match=r"set task\.mask_ratio to 0"):
        ReconstructionTask(mask_ratio=0.5).build_head(
            16, tokenizer=motion, detokenizer="motion", decoder_dim=16, depth=1, num_heads=2
        )
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        ReconstructionTask(mask_ratio=1.0)


def test_task_to_pixels_undoes_the_loader_normalisation():
    task = ReconstructionTask(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    x = torch.zeros(1, 2, 3, 2, 2)  # frames [B, T, C, H, W]
    out = task.to_pixels(x)
    assert out[0, 0, :, 0, 0].tolist() == [0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="3 channels"):
        task.to_pixels(torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("kind", ["vq_pixels", "points_no_cls", "motion_vq"])
def test_every_trainable_parameter_gets_a_gradient(kind):
    """DDP (without find_unused_parameters) stalls on a trainable parameter no forward uses: a VQ image tokenizer
    hides nothing (no mask token), a points tokenizer without cls needs no context position."""
    torch.manual_seed(0)
    if kind == "vq_pixels":
        tok = ImagePatches(img_size=8, patch_size=2, in_chans=1, embed_dim=16)
        head = ReconstructionHead(
            16, "pixels", 16, 1, 2, norm_pix_loss=False, codebook_size=8, code_dim=4, tokenizer=tok
        )
        images = torch.randn(2, 1, 8, 8)
        out = head(tok(images), target=images)
    elif kind == "points_no_cls":
        tok = PointGroups(num_groups=8, group_size=4, embed_dim=16, class_token=False)
        head = ReconstructionHead(16, "points", 16, 1, 2, tokenizer=tok)
        points = torch.randn(2, 64, 3)
        m = random_masking(2, 8, 0.5)
        out = head(keep_tokens(tok(points), m.ids_keep), masking=m, target=points)
    else:
        tok = MotionTokens(embed_dim=16, patch_size=1, t_patch=2, source="codec", img_size=32, num_frames=8)
        head = ReconstructionHead(16, "motion", 16, 1, 2, codebook_size=8, code_dim=4, tokenizer=tok)
        field = torch.randn(2, 7, 2, 2, 2)
        out = head(tok(motion=field), target=field)
    out.loss.backward()
    unused = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_vq_pixels_refuse_normalised_targets_and_masked_heads_check_the_kept_count():
    tok = ImagePatches(img_size=8, patch_size=2, in_chans=1, embed_dim=16)
    with pytest.raises(ValueError, match="norm_pix_loss: false"):
        ReconstructionHead(16, "pixels", 16, 1, 2, norm_pix_loss=True, codebook_size=8, tokenizer=tok)
    head = ReconstructionHead(16, "pixels", 16, 1, 2, tokenizer=tok)
    tokens = tok(torch.randn(2, 1, 8, 8))
    m = random_masking(2, 16, 0.5)
    pooled = keep_tokens(tokens, m.ids_keep[:, :4])  # as if an adapter had pooled the kept tokens
    with pytest.raises(ValueError, match="changed the token count"):
        head(pooled, masking=m)


def test_evaluation_scores_every_checkpoint_on_the_same_masks():
    from pathlib import Path
    from types import SimpleNamespace

    from mmblocks.builders import build_encoder
    from mmblocks.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/pretrain/textures_mae_vit_tiny.yaml")
    task = ReconstructionTask()
    model = build_encoder(cfg, task=task, verbose=False).eval()
    batch = SimpleNamespace(inputs=torch.randn(3, 3, 32, 32), mask=None, extra={}, model_inputs=None)
    batch.model_inputs = lambda: ((batch.inputs,), {})
    draws = []
    for _ in range(2):
        metrics = task.new_metrics(torch.device("cpu"))
        with torch.no_grad():
            out = task._call(model, batch, metrics.generator, aux=False)
        draws.append(out.masking.ids_keep)
    assert torch.equal(draws[0], draws[1])
    with torch.no_grad():
        fresh = task._call(model, batch, None, aux=False).masking.ids_keep  # training draws from the global RNG
    assert fresh.shape == draws[0].shape

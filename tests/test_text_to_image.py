"""`CodeLMHead` (an LM whose vocabulary is extended with a VQ codebook) against its oracle, the same HF model with its
vocabulary really resized (`resize_token_embeddings`) and the new rows set to our code embeddings and code output
layer: teacher-forced logits and greedy generation (HF `generate`, constrained to the codes) agree. Plus: the VQ
tokenizer stays frozen, and the text -> digit recipe runs end to end from a trained VQ tokenizer's checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from data_helpers import short_run
from tiny_configs import tiny_config

from mmblocks.heads import CodeLMHead
from mmblocks.llm import load_lm
from mmblocks.recipes import build_trainer
from mmblocks.tasks import digits_judge
from tokenizers_mm.image import ImagePatches

REPO = Path(__file__).resolve().parents[1]
K = 12  # codebook size


def _head(tune: str = "frozen") -> CodeLMHead:
    torch.manual_seed(0)
    lm = load_lm("random:llama", config_overrides=tiny_config("llama"), seed=0, tune=tune, attn_implementation="eager")
    tok = ImagePatches(img_size=8, patch_size=2, in_chans=1, embed_dim=16)
    head = CodeLMHead(16, lm, decoder_dim=16, depth=1, num_heads=2, codebook_size=K, code_dim=4, tokenizer=tok)
    with torch.no_grad():
        head.code_head.bias.zero_()  # HF's lm_head has no bias
    return head.eval()


def _resized_oracle(head: CodeLMHead):
    """The HF model with vocabulary V + K + 2: ids V..V+K-1 the codes, V+K <boi>, V+K+1 <eoi>."""
    lm = copy.deepcopy(head.lm)
    v = lm.get_input_embeddings().weight.shape[0]
    lm.resize_token_embeddings(v + K + 2)
    with torch.no_grad():
        lm.get_input_embeddings().weight[v:] = head.code_embed.weight
        out = lm.get_output_embeddings().weight
        out[v : v + K] = head.code_head.weight[:K]
        out[v + K + 1] = head.code_head.weight[K]  # <eoi>
        out[v + K] = 0.0
    return lm, v


def _prompts():
    ids = torch.tensor([[0, 0, 5, 9, 17], [3, 4, 5, 6, 7]])  # left-padded with the pad id 0
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask


def test_teacher_forced_logits_equal_the_resized_hf_model():
    head = _head()
    lm, v = _resized_oracle(head)
    ids, mask = _prompts()
    codes = torch.tensor([[1, 5, 11, 0], [7, 7, 2, 3]])
    ours = head.code_head(head._hidden(ids, mask, codes)[:, ids.shape[1] :])
    seq = torch.cat([ids, torch.full((2, 1), v + K), codes + v], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = lm(input_ids=seq, attention_mask=full_mask, position_ids=position_ids).logits[:, ids.shape[1] :]
    cols = [*range(v, v + K), v + K + 1]
    torch.testing.assert_close(ours, logits[..., cols], atol=1e-5, rtol=1e-5)
    # and the loss is the cross-entropy of codes then <eoi>
    targets = torch.cat([codes, torch.full((2, 1), K)], dim=1)
    expected = F.cross_entropy(logits[..., cols].reshape(-1, K + 1), targets.reshape(-1))
    hidden = head._hidden(ids, mask, codes)
    got = F.cross_entropy(head.code_head(hidden[:, ids.shape[1] :]).reshape(-1, K + 1), targets.reshape(-1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_greedy_generation_equals_hf_generate_constrained_to_the_codes():
    head = _head()
    lm, v = _resized_oracle(head)
    ids, mask = _prompts()
    ours = head.generate(ids, mask, num_codes=6, temperature=0.0)
    seq = torch.cat([ids, torch.full((2, 1), v + K)], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    codes_only = list(range(v, v + K))
    with torch.no_grad():
        out = lm.generate(
            input_ids=seq,
            attention_mask=full_mask,
            max_new_tokens=6,
            do_sample=False,
            prefix_allowed_tokens_fn=lambda batch_id, sent: codes_only,
            pad_token_id=0,
        )
    assert torch.equal(ours, out[:, seq.shape[1] :] - v)


def test_sampling_is_seeded_and_stays_in_the_codebook():
    head = _head()
    ids, mask = _prompts()
    a = head.generate(ids, mask, 8, temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(0))
    b = head.generate(ids, mask, 8, temperature=1.0, top_k=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and int(a.min()) >= 0 and int(a.max()) < K


def test_the_vq_tokenizer_stays_frozen_while_the_extension_trains():
    head = _head(tune="lora")
    head.train()
    assert not head.vq.training and not head.detokenizer.training
    before = {k: v.clone() for k, v in head.vq.state_dict().items()}
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert any(n.startswith("code_embed") for n in trainable) and any("lora" in n for n in trainable)
    assert not any(n.startswith(("vq", "pre_vq", "post_vq", "detokenizer")) for n in trainable)
    from tokenizers_mm import Tokens

    ids, mask = _prompts()
    out = head(Tokens(x=torch.randn(2, 16, 16), grid=(4, 4)), ids, mask)
    out.loss.backward()
    assert head.code_embed.weight.grad is not None
    assert all(torch.equal(v, head.vq.state_dict()[k]) for k, v in before.items())


def test_the_judge_reads_real_digits():
    judge, acc = digits_judge(0)
    assert hasattr(judge, "predict")
    assert acc > 0.9  # logistic regression on the real 8x8 digits (scikit-learn: ~96%)


@pytest.mark.slow
def test_recipe_runs_from_a_trained_vq_tokenizer(small_datasets, tmp_path):
    root = small_datasets("digits")
    vq = build_trainer(REPO / "configs/pretrain/digits_vq_pixels.yaml", short_run(root, tmp_path / "vq", steps=2)).fit()
    assert vq["test"]["codebook_usage"] > 0
    overrides = [*short_run(root, tmp_path / "t2i", steps=2), f"model.init.checkpoint={tmp_path / 'vq'}"]
    overrides += ["task.samples=2", "data.val_split=null"]
    summary = build_trainer(REPO / "configs/generation/digits_text_to_image_smollm2.yaml", overrides).fit()
    test = summary["test"]
    assert {"generated_acc", "distinct", "judge_acc_real", "judge_acc_recon", "loss"} <= set(test)
    assert test["chance"] == pytest.approx(0.1) and test["judge_acc_real"] > 0.9
    assert (tmp_path / "t2i" / "report" / "generated_test.png").exists()


def test_the_recipe_refuses_to_start_without_a_trained_vq_tokenizer(small_datasets, tmp_path):
    from mmblocks.config import ConfigError

    root = small_datasets("digits")
    with pytest.raises(ConfigError, match=r"model\.init\.checkpoint"):
        build_trainer(REPO / "configs/generation/digits_text_to_image_smollm2.yaml", short_run(root, tmp_path / "t2i"))

"""Text towers against their oracles: `transformers`' own AutoModel + AutoTokenizer with the same mean pooling (the
real all-MiniLM-L6-v2 weights of the offline package, and for ``llm_blocks`` a decoder LM run causally), and
open_clip's own encode_text."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mmblocks.llm.sources import resolve_source
from mmblocks.models import LLMBlocksTower, MiniLMTower, OpenCLIPTextTower, create_text_tower, list_text_towers
from tokenizers_mm import Tokens

SENTENCES = ["a photo of a dog", "a picture of a puppy", "the stock market crashed today", "seven"]


@pytest.fixture(scope="module")
def minilm():
    return create_text_tower("minilm")


def test_towers_are_registered():
    assert {"minilm", "open_clip", "llm_blocks"} <= set(list_text_towers())


def test_minilm_equals_transformers_automodel_with_mean_pooling(minilm):
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_source("all-minilm-l6-v2").path
    model, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        reference = (states * m).sum(1) / m.sum(1)
        ours = minilm(minilm.tokenize(SENTENCES))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert minilm.width == 384 and ours.shape == (4, 384)


def test_minilm_padding_changes_nothing_and_embeddings_mean_something(minilm):
    with torch.no_grad():
        batch = F.normalize(minilm(minilm.tokenize(SENTENCES)), dim=-1)
        alone = torch.cat([F.normalize(minilm(minilm.tokenize([s])), dim=-1) for s in SENTENCES])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)  # the short ones were padded in the batch
    sim = batch @ batch.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # real weights: a dog and a puppy are closer than a market crash


def test_minilm_frozen_stays_locked_and_full_trains(minilm):
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training  # a locked tower runs no dropout
    full = MiniLMTower(tune="full").train()
    out = full(full.tokenize(SENTENCES[:2]))
    out.sum().backward()
    assert full.model.embeddings.word_embeddings.weight.grad is not None
    with pytest.raises(ValueError, match="int64 token ids"):
        full(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="'frozen' or 'full'"):
        MiniLMTower(tune="lora")


def test_open_clip_text_tower_equals_encode_text(tmp_path):
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 24,
        "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.manual_seed(0)
    clip = open_clip.create_model(f"local-dir:{tmp_path}")  # random weights, saved as a user's checkpoint would be
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    reference = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    tower = OpenCLIPTextTower(f"local-dir:{tmp_path}")
    ids = tower.tokenize(SENTENCES)
    assert ids.shape == (4, 12) and not hasattr(tower.clip, "visual")
    with torch.no_grad():
        torch.testing.assert_close(tower(ids), reference.encode_text(ids))
    assert tower._trimmable()  # the columns after the longest prompt were cut: the same features
    assert tower.width == 24
    with pytest.raises(ValueError, match="would be downloaded"):
        OpenCLIPTextTower("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


def _ids(tower: LLMBlocksTower, vocab: int) -> torch.Tensor:
    """Three right-padded rows of random ids below `vocab`, avoiding the pad id."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    ids[ids == tower.pad_id] = 3
    ids[1, 6:] = tower.pad_id
    ids[2, 3:] = tower.pad_id
    return ids


def test_llm_blocks_causal_equals_the_lm_itself_with_mean_pooling(tiny_checkpoint):
    """With causal attention and every layer, the tower is the decoder's own last hidden state (the model's final
    norm included), mean-pooled over the real tokens: `transformers`' AutoModel is the oracle."""
    from transformers import AutoModel

    folder = tiny_checkpoint("llama")
    tower = LLMBlocksTower(str(folder), attention="causal", tokenizer="smollm2-135m")
    reference = AutoModel.from_pretrained(folder).eval()
    ids = _ids(tower, reference.config.vocab_size)
    mask = (ids != tower.pad_id).long()
    with torch.no_grad():
        states = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        torch.testing.assert_close(tower(ids), (states * m).sum(1) / m.sum(1), rtol=1e-4, atol=1e-5)
    assert tower.width == reference.config.hidden_size and tower.tune == "frozen"
    assert not any(p.requires_grad for p in tower.parameters())


def test_llm_blocks_bidirectional_sees_ahead_and_ignores_padding(tiny_checkpoint):
    folder = tiny_checkpoint("llama")
    tower = LLMBlocksTower(str(folder), tokenizer="smollm2-135m")
    ids = _ids(tower, 128)
    with torch.no_grad():
        full = tower(ids)
        alone = torch.cat([tower(row[row != tower.pad_id][None]) for row in ids])
        torch.testing.assert_close(full, alone, rtol=1e-4, atol=1e-5)  # padding changes nothing
        first = tower.blocks(Tokens(tower.embed(ids[:1]))).x[0, 0]
        changed = ids[:1].clone()
        changed[0, -1] = changed[0, -1] % 100 + 4
        moved = tower.blocks(Tokens(tower.embed(changed))).x[0, 0]
    assert not torch.allclose(first, moved)  # the first token sees the last one: bidirectional


def test_llm_blocks_lora_trains_only_the_adapters(tiny_checkpoint):
    tower = LLMBlocksTower(str(tiny_checkpoint("llama")), tune="lora", tune_kwargs={"r": 2}, tokenizer="smollm2-135m")
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable) and tower.tune == "lora"
    tower.train()
    tower(_ids(tower, 128)).pow(2).sum().backward()
    assert all(p.grad is not None for p in tower.parameters() if p.requires_grad)
    assert tower.embed.weight.grad is None
    with pytest.raises(ValueError, match="'frozen', 'lora' or 'full'"):
        LLMBlocksTower(str(tiny_checkpoint("llama")), tune="gated", tokenizer="smollm2-135m")

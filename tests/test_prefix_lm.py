"""`PrefixLMHead` against its oracles: the HF model's own forward and `generate`, hand-computed losses, batching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import tiny_config

from adapters import create_adapter
from mmblocks.heads import IGNORE_INDEX, PrefixLMHead
from mmblocks.llm import load_lm
from tokenizers_mm import Tokens

FAMILIES = ["llama", "qwen2", "gemma", "opt", "gpt2"]


def _lm(family: str, tune: str = "frozen", **kwargs):
    overrides = dict(tiny_config(family))
    return load_lm(
        f"random:{family}", config_overrides=overrides, seed=0, tune=tune, attn_implementation="eager", **kwargs
    )


def _ids(batch: int = 2, length: int = 7, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _modality(width: int, batch: int = 2, n: int = 5, seed: int = 2, mask: torch.Tensor | None = None) -> Tokens:
    x = torch.randn(batch, n, width, generator=torch.Generator().manual_seed(seed)) * 0.02
    return Tokens(x, mask=mask, modality="image")


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_equals_the_plain_model(family):
    """No modality tokens: logits and greedy generations are the HF model's own (embeddings through the model's
    embedding module, so Gemma's scaling applies)."""
    lm = _lm(family)
    head = PrefixLMHead(lm, markers=False)
    ids = _ids()
    with torch.no_grad():
        ours = head(None, ids).logits
        theirs = lm(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    new = head.generate(None, ids[:1], max_new_tokens=6, do_sample=False)
    ref = lm.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6, do_sample=False)
    assert torch.equal(new, ref[:, ids.shape[1] :])


@pytest.mark.parametrize("family", FAMILIES)
def test_spliced_logits_equal_the_models_forward_on_the_same_embeddings(family):
    lm = _lm(family)
    head = PrefixLMHead(lm, markers=True)
    ids = _ids()
    tokens = _modality(head.hidden_size)
    with torch.no_grad():
        out = head(tokens, ids)
        text = lm.get_input_embeddings()(ids)
        marks = torch.stack([head.begin, head.end])
        embeds = torch.cat([marks[None, :1].expand(2, 1, -1), tokens.x, marks[None, 1:].expand(2, 1, -1), text], 1)
        ref = lm(inputs_embeds=embeds).logits
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    assert out.batch.modality_span.tolist() == [[0, 7], [0, 7]]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_generation_equals_one_sample_at_a_time(family):
    """Different numbers of real modality tokens and of text tokens in one batch: every sample generates exactly what
    it generates alone (left padding, positions counted over real tokens)."""
    lm = _lm(family)
    head = PrefixLMHead(lm, markers=True)
    ids = _ids(batch=3, length=6)
    text_mask = torch.ones_like(ids)
    text_mask[1, :2] = 0  # sample 1 has a shorter, left-padded prompt
    mod_mask = torch.ones(3, 5, dtype=torch.bool)
    mod_mask[0, 3:] = False
    mod_mask[2, 1:] = False
    tokens = _modality(head.hidden_size, batch=3, mask=mod_mask)
    together = head.generate(tokens, ids, attention_mask=text_mask, max_new_tokens=5, do_sample=False)
    for b in range(3):
        keep = text_mask[b].bool()
        alone_tokens = Tokens(tokens.x[b : b + 1, mod_mask[b]], modality="image")
        alone = head.generate(alone_tokens, ids[b : b + 1, keep], max_new_tokens=5, do_sample=False)
        assert torch.equal(together[b], alone[0]), f"{family} sample {b}: {together[b]} vs {alone[0]}"


def test_loss_is_the_shifted_cross_entropy_on_answer_tokens_only():
    lm = _lm("llama")
    head = PrefixLMHead(lm, markers=True)
    ids = _ids(length=8)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt: no loss
    tokens = _modality(head.hidden_size)
    out = head(tokens, ids, labels=labels)
    n_mod = 5 + 2
    logits = out.logits[:, n_mod - 1 : -1]  # position t predicts text token t
    hand = F.cross_entropy(logits[:, 5:].reshape(-1, logits.shape[-1]).float(), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(out.loss, hand, atol=1e-6, rtol=1e-6)
    assert (out.batch.labels[:, : n_mod + 5] == IGNORE_INDEX).all()
    # what the ignored prompt labels hold does not matter
    other = labels.clone()
    other[:, :5] = IGNORE_INDEX
    assert torch.equal(head(tokens, ids, labels=other).loss, out.loss)


def test_a_sample_without_labels_is_refused():
    lm = _lm("llama")
    head = PrefixLMHead(lm)
    ids = _ids()
    labels = ids.clone()
    labels[1] = IGNORE_INDEX
    with pytest.raises(ValueError, match="sample 1 has no label"):
        head(_modality(head.hidden_size), ids, labels=labels)


def test_placeholder_takes_the_modality_tokens_in_place():
    lm = _lm("llama")
    head = PrefixLMHead(lm, placeholder_id=5, markers=False)
    ids = _ids(length=6)
    ids[ids == 5] = 6
    ids[0, 2] = 5
    ids[1, 4] = 5
    tokens = _modality(head.hidden_size, n=3)
    out = head(tokens, ids)
    text = lm.get_input_embeddings()(ids)
    for b, p in ((0, 2), (1, 4)):
        expected = torch.cat([text[b, :p], tokens.x[b], text[b, p + 1 :]])
        torch.testing.assert_close(out.batch.inputs_embeds[b], expected)
        assert out.batch.modality_span[b].tolist() == [p, p + 3]
    ids[1, 1] = 5  # twice in one sample
    with pytest.raises(ValueError, match="placeholder id 5 2 times"):
        head(tokens, ids)


def test_max_length_never_cuts_inside_the_modality_span():
    lm = _lm("llama")
    head = PrefixLMHead(lm, markers=True, max_length=10)
    ids = _ids(length=8)
    out = head(_modality(head.hidden_size, n=3), ids)
    assert out.logits.shape[1] == 10  # 5 modality + markers, then 5 of the 8 text tokens
    with pytest.raises(ValueError, match="cut inside the modality tokens"):
        head(_modality(head.hidden_size, n=9), ids)


def test_frozen_lm_stays_bit_identical_while_the_head_trains():
    lm = _lm("llama")
    head = PrefixLMHead(lm, adapter=create_adapter("mlp", 16, lm.config.hidden_size), markers=True)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in [head.begin, head.end, *head.adapter.parameters()]}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = _ids()
    tokens = Tokens(torch.randn(2, 4, 16), modality="image")
    start = head.begin.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        head(tokens, ids, labels=ids).loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    assert not torch.equal(head.begin.detach(), start)


def test_lora_with_b_zero_equals_the_frozen_model():
    frozen = _lm("llama")
    lora = _lm("llama", tune="lora", r=4)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = _ids()
    tokens = _modality(frozen.config.hidden_size)
    a, b = PrefixLMHead(frozen, markers=False), PrefixLMHead(lora, markers=False)
    lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(tokens, ids).logits, a(tokens, ids).logits, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_smollm2_reads_text_embeddings_as_modality_tokens():
    """The real SmolLM2: the embeddings of "The capital of France" given as modality tokens, " is" as text, greedily
    continue with " Paris", as the text prompt does."""
    from mmblocks.llm import load_tokenizer

    lm, tok = load_lm("smollm2-135m"), load_tokenizer("smollm2-135m")
    head = PrefixLMHead(lm, markers=False)
    prefix = tok("The capital of France", return_tensors="pt").input_ids
    ids = tok(" is", return_tensors="pt").input_ids
    with torch.no_grad():
        tokens = Tokens(lm.get_input_embeddings()(prefix), modality="text")
    new = head.generate(tokens, ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(new[0]).startswith(" Paris")
    text = lm.generate(torch.cat([prefix, ids], 1), max_new_tokens=2, do_sample=False)[:, prefix.shape[1] + 1 :]
    assert torch.equal(new, text)


def test_splice_equals_llava_with_the_same_projector():
    """A tiny `LlavaForConditionalGeneration` (CLIP tower + Llama): its logits for a prompt holding N image tokens
    equal ours for the same prompt with one placeholder, the tower's features (its layer, CLS dropped) as `Tokens`
    and the `mlp` adapter holding its projector's weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(**tiny_config("llama"))
    image_id = 100
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, projector_hidden_act="gelu")
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    adapter = create_adapter("mlp", 32, 64)
    proj = llava.model.multi_modal_projector
    with torch.no_grad():
        adapter.net[0].load_state_dict(proj.linear_1.state_dict())
        adapter.net[2].load_state_dict(proj.linear_2.state_dict())
    head = PrefixLMHead(llava, adapter, placeholder_id=image_id, markers=False)

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    n = (32 // 8) ** 2
    ids = _ids(length=6)
    ids[ids == image_id] = 7
    single = torch.cat([ids[:, :2], torch.full((2, 1), image_id), ids[:, 2:]], 1)
    expanded = torch.cat([ids[:, :2], torch.full((2, n), image_id), ids[:, 2:]], 1)
    with torch.no_grad():
        tower = llava.model.vision_tower(pixels, output_hidden_states=True)
        features = tower.hidden_states[config.vision_feature_layer][:, 1:]
        ours = head(Tokens(features, modality="image"), single).logits
        theirs = llava(input_ids=expanded, pixel_values=pixels).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_bf16_frozen_lm_trains_an_fp32_adapter():
    """A large frozen LM is kept in bf16: the fp32 adapter's tokens are cast at the splice, the loss is computed in
    fp32, the adapter's gradients are finite fp32, and the logits follow the fp32 model's within bf16 rounding."""
    lm32 = _lm("llama")
    lm16 = _lm("llama", dtype="bfloat16")
    assert next(lm16.parameters()).dtype == torch.bfloat16
    adapter = create_adapter("mlp", 16, lm16.config.hidden_size)
    head16 = PrefixLMHead(lm16, adapter, markers=True)
    head32 = PrefixLMHead(lm32, adapter, markers=True)
    tokens = Tokens(torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(5)), modality="image")
    ids = _ids()
    out = head16(tokens, ids, labels=ids)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in adapter.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        ref = head32(tokens, ids).logits
    torch.testing.assert_close(out.logits.float(), ref, atol=0.05, rtol=0.05)

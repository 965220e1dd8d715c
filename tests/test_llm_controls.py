"""The controls of "do the pretrained weights help?": shuffled and random_matched keep each tensor's values or
statistics and lose the arrangement; scratch trains the family's init; none of them perturbs the rest of a model's
init; the update RMS, Block Influence and linear CKA measure what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmblocks.analysis import (
    block_influence,
    control_update_rms,
    layer_outputs,
    linear_cka,
    text_hidden_states,
    update_rms,
)
from mmblocks.cli import main
from mmblocks.llm import load_blocks

FAMILIES = ["llama", "gemma3_text", "gpt2", "opt"]


def _params(blocks) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in blocks.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_shuffled_permutes_every_tensor_and_stays_frozen(family, tiny_checkpoint):
    pre = load_blocks(tiny_checkpoint(family), [0, 1], final_norm="llm" if family != "opt" else "rms_unit")
    shuf = load_blocks(
        tiny_checkpoint(family), [0, 1], tune="shuffled", seed=3, final_norm="llm" if family != "opt" else "rms_unit"
    )
    a, b = _params(pre), _params(shuf)
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k].flatten().sort().values, b[k].flatten().sort().values, msg=k)
        if a[k].numel() > 1 and a[k].unique().numel() > 1:
            moved += int(not torch.equal(a[k], b[k]))
            assert not torch.equal(a[k], b[k]), f"{k} was not permuted"
    assert moved > 0
    assert shuf.trainable_parameters() == []
    shuf.train()
    assert not any(layer.training for layer in shuf.layers)
    for (name, buf), (_, buf_pre) in zip(shuf.named_buffers(), pre.named_buffers()):
        torch.testing.assert_close(buf, buf_pre, msg=f"buffer {name} must be untouched")


def test_shuffled_is_reproducible_per_seed(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    one, again, other = (_params(load_blocks(path, [0], tune="shuffled", seed=s)) for s in (1, 1, 2))
    k = next(k for k, v in one.items() if v.dim() == 2)
    assert torch.equal(one[k], again[k]) and not torch.equal(one[k], other[k])


def test_random_matched_keeps_each_tensors_mean_and_std(tiny_checkpoint):
    pre = _params(load_blocks(tiny_checkpoint("llama"), [0, 1]))
    blocks = load_blocks(tiny_checkpoint("llama"), [0, 1], tune="random_matched", seed=0)
    new = _params(blocks)
    for k, v in pre.items():
        if v.numel() >= 1024:
            assert abs(float(new[k].std()) / float(v.std()) - 1) < 0.1, k
            assert abs(float(new[k].mean()) - float(v.mean())) < 0.1 * float(v.std()) + 1e-6, k
            assert not torch.equal(new[k], v)
    assert blocks.trainable_parameters() == []


def test_scratch_is_the_random_init_trained(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    rnd, scratch = load_blocks(path, [0, 1], tune="random", seed=5), load_blocks(path, [0, 1], tune="scratch", seed=5)
    for (k, a), (_, b) in zip(rnd.named_parameters(), scratch.named_parameters()):
        torch.testing.assert_close(a, b, msg=k)
    assert rnd.trainable_parameters() == []
    assert len(scratch.trainable_parameters()) == len(list(scratch.parameters()))
    scratch.train()
    assert all(layer.training for layer in scratch.layers)


@pytest.mark.parametrize("tune", ["frozen", "random", "shuffled", "random_matched", "scratch"])
def test_controls_do_not_advance_the_global_generator(tune, tiny_checkpoint):
    """Paired arms: the adapters built after the block get the same init in every arm of one seed."""
    torch.manual_seed(11)
    load_blocks(tiny_checkpoint("llama"), [0], tune=tune)
    after = torch.rand(3)
    torch.manual_seed(11)
    torch.testing.assert_close(after, torch.rand(3))


def test_random_layers_are_distinct_draws_and_follow_the_training_seed(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    torch.manual_seed(1)
    a = load_blocks(path, [0, 1], tune="random")
    torch.manual_seed(1)
    b = load_blocks(path, [0, 1], tune="random")
    torch.manual_seed(2)
    c = load_blocks(path, [0, 1], tune="random")
    qa = [layer.self_attn.q_proj.weight for layer in a.layers]
    assert not torch.equal(qa[0], qa[1]), "two layers of one load must not share one draw"
    torch.testing.assert_close(qa[0], b.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(qa[0], c.layers[0].self_attn.q_proj.weight)


def test_update_rms_is_the_residual_update_before_the_final_norm(tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint("llama"), [0, 1], final_norm="rms_unit")
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = x
        kwargs = blocks.layer_kwargs(2, 7, None, x.device, x.dtype)["full_attention"]
        for layer in blocks.layers:
            h = layer(h, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
    torch.testing.assert_close(layer_outputs(blocks, x), h)
    assert update_rms(blocks, x) == pytest.approx(float((h - x).norm() / x.norm()), rel=1e-5)
    assert isinstance(blocks.final_norm, torch.nn.Module) and blocks.final_norm_kind == "rms_unit"
    # masked tokens do not count
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    masked = layer_outputs(blocks, x, mask)
    want = float((masked[mask] - x[mask]).norm() / x[mask].norm())
    assert update_rms(blocks, x, mask) == pytest.approx(want, rel=1e-5)
    assert want != pytest.approx(float((h - x).norm() / x.norm()), rel=1e-3)  # padded tokens do not count


def test_block_influence_and_linear_cka_against_references():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g)
    assert block_influence(x, x) == pytest.approx(0.0, abs=1e-6)
    assert block_influence(x, -x) == pytest.approx(2.0, abs=1e-6)
    a = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(a, 3.0 * a @ q + 1.0) == pytest.approx(1.0, abs=1e-9)
    b = torch.randn(200, 8, generator=g)
    # Kornblith et al.'s HSIC form: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)) with K = A A^T, L = B B^T
    an, bn = a.double().numpy(), b.double().numpy()
    h = np.eye(200) - 1 / 200
    k, lm = an @ an.T, bn @ bn.T
    ref = np.trace(k @ h @ lm @ h) / np.sqrt(np.trace(k @ h @ k @ h) * np.trace(lm @ h @ lm @ h))
    assert linear_cka(a, b) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="same M"):
        linear_cka(a, b[:10])


def test_smollm2_controls_match_the_pretrained_update_scale():
    """The point of the scale-matched controls on the real SmolLM2: `random` (std 0.02) barely moves its input;
    shuffled / random_matched move the LM's own hidden states by the pretrained block's order of magnitude."""
    text = text_hidden_states("smollm2-135m", -1)
    assert text.shape[0] == 1 and text.shape[-1] == 576 and float(text.pow(2).mean().sqrt()) > 5
    rows = {r["tune"]: r for r in control_update_rms("smollm2-135m", [-1], inputs={"text": text})}
    pre = rows["frozen"]["text"]
    for tune in ("shuffled", "random_matched"):
        assert 0.5 < rows[tune]["text"] / pre < 2, rows
    assert rows["random"]["text"] < 0.05 * pre, rows


def test_blocks_show_prints_the_control_table(capsys, tiny_checkpoint):
    with pytest.warns(UserWarning, match="no text hidden states"):  # the tiny folder has no tokenizer
        assert main(["blocks", "show", str(tiny_checkpoint("llama")), "--layers", "0"]) == 0
    out = capsys.readouterr().out
    assert "update RMS" in out
    for label in ("frozen (pretrained)", "shuffled", "random_matched", "random"):
        assert f"| {label} |" in out

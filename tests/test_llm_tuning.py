"""Tuning modes open exactly the parameters they name, and the additive ones start as promised."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmblocks.layers.norms import is_norm_module
from mmblocks.llm import load_blocks

FAMILIES = ["llama", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox", "bert"]


def _x(requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)).requires_grad_(requires_grad)


def _grads(blocks) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in blocks.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_gives_no_parameter_gradient_but_input_gradient(family, tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint(family), [0, 1])
    blocks.train()  # a parent module's .train() must not turn dropout back on in frozen layers
    assert not any(layer.training for layer in blocks.layers)
    assert blocks.trainable_parameters() == []
    x = _x(requires_grad=True)
    blocks(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in blocks.parameters())
    with torch.no_grad():  # eval mode: deterministic even where the family has dropout (GPT-2, OPT, BERT)
        torch.testing.assert_close(blocks(_x()), blocks(_x()))


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_tuning_trains_only_norm_weights(family, tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint(family), [0, 1], tune="norm", final_norm="llm" if family != "bert" else "none")
    expected = sum(
        p.numel()
        for m in list(blocks.layers.modules()) + list(blocks.final_norm.modules())
        if is_norm_module(m)
        for p in m.parameters(recurse=False)
    )
    assert expected > 0
    assert sum(p.numel() for p in blocks.trainable_parameters()) == expected
    blocks(_x()).square().sum().backward()
    for name, p in blocks.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_norm_count_for_llama(tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint("llama"), [0, 1], tune="norm", final_norm="llm")
    # two RMSNorm weights per layer plus the final norm, each of width 64
    assert sum(p.numel() for p in blocks.trainable_parameters()) == (2 * 2 + 1) * 64


@pytest.mark.parametrize(
    ("target", "shapes"),
    [
        # (in, out) of q, k, v, o in the tiny Llama: 4 heads x 16, 2 KV heads x 16
        ("attention", [(64, 64), (64, 32), (64, 32), (64, 64)]),
        ("mlp", [(64, 128), (64, 128), (128, 64)]),
        ("all-linear", [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]),
    ],
)
def test_lora_parameter_count(target, shapes, tiny_checkpoint):
    r = 4
    blocks = load_blocks(tiny_checkpoint("llama"), [0, 1], tune="lora", r=r, alpha=8, target=target)
    expected = 2 * sum(r * (i + o) for i, o in shapes)
    assert sum(p.numel() for p in blocks.trainable_parameters()) == expected
    assert all("lora_" in n for n, p in blocks.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_starts_as_the_frozen_block_and_trains_adapters(family, tiny_checkpoint):
    folder = tiny_checkpoint(family)
    base = load_blocks(folder, [0, 1])
    lora = load_blocks(folder, [0, 1], tune="lora", target="all-linear").eval()  # GPT-2/OPT/BERT have dropout
    with torch.no_grad():
        torch.testing.assert_close(lora(_x()), base(_x()), atol=1e-6, rtol=0)
    lora(_x()).square().sum().backward()
    trained = [n for n, g in _grads(lora).items() if g]
    assert trained and all("lora_" in n for n in trained)


def test_full_tuning_trains_everything(tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint("llama"), [0, 1], tune="full", final_norm="llm")
    assert len(blocks.trainable_parameters()) == len(list(blocks.parameters()))


@pytest.mark.parametrize("family", FAMILIES)
def test_random_has_pretrained_shapes_but_other_values(family, tiny_checkpoint):
    folder = tiny_checkpoint(family)
    pre = load_blocks(folder, [1])
    rnd = load_blocks(folder, [1], tune="random", seed=0)
    again = load_blocks(folder, [1], tune="random", seed=0)
    sd_pre, sd_rnd, sd_again = pre.state_dict(), rnd.state_dict(), again.state_dict()
    assert sd_pre.keys() == sd_rnd.keys()
    differs = 0
    for k, v in sd_pre.items():
        assert sd_rnd[k].shape == v.shape, k
        assert torch.isfinite(sd_rnd[k]).all(), k
        torch.testing.assert_close(sd_again[k], sd_rnd[k], msg=f"seeded init must be reproducible: {k}")
        if v.dim() == 2:
            differs += int(not torch.allclose(v, sd_rnd[k]))
    big = sum(1 for v in sd_pre.values() if v.dim() == 2)
    assert differs == big, "every weight matrix must be re-initialised"
    assert rnd.trainable_parameters() == []
    # the family's own init: weight std near initializer_range
    std = max(float(v.std()) for k, v in sd_rnd.items() if v.dim() == 2)
    assert std < 0.1


def test_random_source_builds_from_config_overrides():
    blocks = load_blocks(
        "random:llama",
        [0, -1],
        config_overrides=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1
        ),
        seed=3,
    )
    assert blocks.hidden_size == 32 and blocks.layer_indices == [0, 2]
    assert blocks(torch.randn(1, 4, 32)).shape == (1, 4, 32)


@pytest.mark.parametrize("gate", ["scalar", "channel"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_gated_is_identity_at_init_and_trains_only_gates(family, gate, tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint(family), [0, 1], tune="gated", gate=gate, final_norm="none")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(blocks(x), x, atol=1e-6, rtol=0)
    names = [n for n, p in blocks.named_parameters() if p.requires_grad]
    assert names == ["layers.0.gate", "layers.1.gate"]
    blocks(x).square().sum().backward()
    assert all(g == n.endswith(".gate") for n, g in _grads(blocks).items())


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox"])
def test_expand_equals_frozen_base_at_init_and_trains_only_copies(family, tiny_checkpoint):
    folder = tiny_checkpoint(family)
    base = load_blocks(folder, [1, 2])
    exp = load_blocks(folder, [1, 2], tune="expand")
    assert exp.num_layers == 4 and exp.layer_indices == [1, None, 2, None]
    with torch.no_grad():
        torch.testing.assert_close(exp(_x()), base(_x()), atol=1e-6, rtol=0)
    idx = [m.layer_idx for layer in exp.layers for m in layer.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(idx)) == [0, 1, 2, 3], "copies are renumbered"
    trainable = {n.split(".")[1] for n, p in exp.named_parameters() if p.requires_grad}
    assert trainable == {"1", "3"}
    exp(_x()).square().sum().backward()
    assert all(g <= (n.split(".")[1] in {"1", "3"}) for n, g in _grads(exp).items())
    assert any(_grads(exp).values())


def test_expand_every_k(tiny_checkpoint):
    exp = load_blocks(tiny_checkpoint("llama"), [0, 1, 2, 3], tune="expand", every=2)
    assert exp.layer_indices == [0, 1, None, 2, 3, None]


def test_expand_rejects_post_norm_layers(tiny_checkpoint):
    with pytest.raises(ValueError, match="pre-norm"):
        load_blocks(tiny_checkpoint("bert"), [0], tune="expand")


@pytest.mark.parametrize("merge", ["lerp", "slerp", "dlerp"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_interpolate_equals_frozen_base_at_init(family, merge, tiny_checkpoint):
    folder = tiny_checkpoint(family)
    base = load_blocks(folder, [1, 2])
    interp = load_blocks(folder, [1, 2], tune="interpolate", merge=merge).eval()  # side-car dropout off
    with torch.no_grad():
        torch.testing.assert_close(interp(_x()), base(_x()), atol=1e-6, rtol=0)
    assert float(interp.aux_loss) == 0.0
    # only side-cars (and dlerp's weight projection) train
    for n, p in interp.named_parameters():
        assert p.requires_grad == (".sidecar." in n or "weight_proj" in n), n
    # once the side-car moves, the divergence loss is positive and reaches only the side-car
    with torch.no_grad():
        for p in interp.layers[0].sidecar.parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn_like(p))
    out = interp(_x())
    assert interp.aux_loss.item() > 0
    (out.square().mean() + interp.aux_loss).backward()
    for n, p in interp.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert ".sidecar." in n or "weight_proj" in n, n
    assert torch.isfinite(
        torch.stack([p.grad.abs().sum() for p in interp.trainable_parameters() if p.grad is not None])
    ).all()


def test_slerp_finite_gradient_when_states_coincide(tiny_checkpoint):
    interp = load_blocks(tiny_checkpoint("llama"), [1], tune="interpolate", merge="slerp", train_factor=True)
    interp(_x()).sum().backward()
    grads = [p.grad for p in interp.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_unknown_tune_option_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(TypeError, match=r"tune='lora' got unknown option\(s\) \['rank'\]"):
        load_blocks(tiny_checkpoint("llama"), [0], tune="lora", rank=4)
    with pytest.raises(ValueError, match="tune must be one of"):
        load_blocks(tiny_checkpoint("llama"), [0], tune="freeze")


def test_gradient_checkpointing_matches(tiny_checkpoint):
    a = load_blocks(tiny_checkpoint("llama"), [0, 1], tune="full")
    b = load_blocks(tiny_checkpoint("llama"), [0, 1], tune="full")
    b.set_gradient_checkpointing(True)
    a.train(), b.train()
    a(_x()).square().sum().backward()
    b(_x()).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_parameter_table_lists_layers(tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint("llama"), [0, -1], tune="expand", final_norm="llm")
    table = blocks.parameter_table()
    assert "layer 0" in table and "layer 3" in table and "expansion copy" in table and "total" in table
    assert isinstance(blocks.layers, nn.ModuleList)

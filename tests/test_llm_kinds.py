"""The family kinds discovery added run in every mode: mixture of experts (router loss, LoRA on fused experts,
expansion), ALiBi and in-layer rotary (``rope="none"`` removes every position signal), multi-query parallel
attention."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, hidden_states

from mmblocks.llm import load_blocks
from mmblocks.llm.tuning import lora_target_parameters


def _x(n: int = 9, width: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, n, width, generator=torch.Generator().manual_seed(seed))


def test_moe_router_loss_equals_the_causal_lm_aux_loss(tiny_checkpoint):
    """Every layer of a tiny Mixtral, trained (tune="full"), on the model's own embeddings: `aux_loss` is the
    model's load-balancing loss times `router_aux_loss_coef`, as `MixtralForCausalLM` adds it to its loss."""
    model = build_tiny_model("mixtral")
    model.train()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(ids, output_router_logits=True, output_hidden_states=True)
    coef = model.config.router_aux_loss_coef
    assert coef > 0 and out.aux_loss is not None
    blocks = load_blocks(
        tiny_checkpoint("mixtral"), range(4), attention="causal", rope="native", final_norm="none", tune="full"
    )
    blocks.train()
    blocks(out.hidden_states[0].detach())
    assert isinstance(blocks.aux_loss, torch.Tensor) and blocks.aux_loss.requires_grad
    torch.testing.assert_close(blocks.aux_loss, coef * out.aux_loss.detach(), atol=1e-6, rtol=1e-5)


def test_moe_router_loss_only_while_the_block_trains(tiny_checkpoint):
    frozen = load_blocks(tiny_checkpoint("mixtral"), [0, 1], tune="frozen").train()
    frozen(_x())
    assert frozen.aux_loss == 0.0  # a frozen router is not ours to balance
    tuned = load_blocks(tiny_checkpoint("mixtral"), [0, 1], tune="full")
    tuned.eval()
    tuned(_x())
    assert tuned.aux_loss == 0.0  # evaluation adds nothing
    tuned.train()
    tuned(_x())
    assert float(tuned.aux_loss) > 0


def test_lora_on_fused_experts_trains_through_peft(tiny_checkpoint):
    base = load_blocks(tiny_checkpoint("mixtral"), [1]).eval()
    fused = lora_target_parameters(base, "mlp")
    blocks = load_blocks(tiny_checkpoint("mixtral"), [1], tune="lora", target="mlp", r=4)
    assert {n.split(".", 1)[1] for n in fused} == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    trainable = [n for n, p in blocks.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("experts" in n for n in trainable)
    blocks.eval()
    with torch.no_grad():  # LoRA B starts at zero: the adapted block equals the frozen one
        torch.testing.assert_close(blocks(_x()), base(_x()), atol=1e-6, rtol=0)
    blocks.train()
    blocks(_x()).square().mean().backward()
    grads = [p.grad for n, p in blocks.named_parameters() if p.requires_grad and "lora_A" in n]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("family", ["bloom", "mpt", "llama", "falcon", "mixtral"])
def test_rope_none_removes_every_position_signal(family, tiny_checkpoint):
    """Bidirectional attention without positions is permutation-equivariant: permuting the tokens permutes the
    output. With the family's native positions (ALiBi for Bloom / MPT, rotary for the others) it is not."""
    folder = tiny_checkpoint(family)
    x = _x()
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(2))
    none = load_blocks(folder, [0, 1], rope="none", attn_implementation="eager").eval()
    native = load_blocks(folder, [0, 1], rope="native", attn_implementation="eager").eval()
    with torch.no_grad():
        err_none = float((none(x[:, perm]) - none(x)[:, perm]).abs().max())
        err_native = float((native(x[:, perm]) - native(x)[:, perm]).abs().max())
    assert err_none < 1e-5, f"rope='none' leaves a position signal: {err_none:.2e}"
    assert err_native > 100 * max(err_none, 1e-7), f"native positions change nothing: {err_native:.2e}"


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alibi_native_is_the_models_own_bias(family, tiny_checkpoint):
    """rope="native" with the model's causal mode reproduces its forward (the bias is built as the model builds it)."""
    model = build_tiny_model(family)
    hs, _ = hidden_states(model)
    blocks = load_blocks(tiny_checkpoint(family), [1, 2], attention="causal", rope="native", final_norm="none")
    with torch.no_grad():
        torch.testing.assert_close(blocks(hs[1]), hs[3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "bloom", "falcon", "mpt"])
@pytest.mark.parametrize("attention", ["bidirectional", "causal", "soft"])
@pytest.mark.parametrize("tune", ["frozen", "norm", "lora", "full", "gated", "random"])
def test_every_mode_runs_and_trains(family, attention, tune, tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint(family), [1, 2], attention=attention, tune=tune, seed=0)
    if attention == "soft":
        blocks.set_soft_mask_ratio(0.5)
    blocks.train()
    x = _x().requires_grad_(True)
    out = blocks(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    loss = out.square().mean() + (blocks.aux_loss if isinstance(blocks.aux_loss, torch.Tensor) else 0.0)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    trainable = blocks.trainable_parameters()
    if tune in ("frozen", "random"):
        assert not trainable
    elif tune != "norm" or family != "mixtral":
        assert trainable and any(p.grad is not None for p in trainable)


def test_expand_refuses_a_post_norm_family_with_the_measured_reason(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"pre-norm.*bert.*still changes its input"):
        load_blocks(tiny_checkpoint("bert"), [1], tune="expand")


def test_families_command_reports_discovery_and_the_oracle(capsys):
    from mmblocks.cli import main

    assert main(["blocks", "families", "--check", "mixtral", "bloom", "mamba", "xlm"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["mixtral"].split()[1] == "passes" and " yes " in rows["mixtral"]
    assert rows["bloom"].split()[1] == "passes" and "ALiBi" in rows["bloom"]
    assert rows["mamba"].split()[1] == "skipped" and "no attention layer" in rows["mamba"]
    assert rows["xlm"].split()[1] == "fails" and "several candidate layer stacks" in rows["xlm"]
    assert main(["blocks", "families", "--markdown", "llama"]) == 0
    table = capsys.readouterr().out
    assert "1 causal-LM architectures; 1 discovered; 0 carry an entry" in table
    assert "| llama | discovered | `layers` LlamaDecoderLayer | rotary |" in table

"""What discovery finds holds for each core architecture (paths, norms, residual outputs, tuning)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from tiny_configs import CORE_FAMILIES

from mmblocks.layers.norms import is_norm_module
from mmblocks.llm import get_family, load_blocks, lora_target_modules
from mmblocks.llm.tuning import lora_target_parameters

FAMILY_NAMES = CORE_FAMILIES


def _stack(model, family):
    spec = get_family(family)
    decoder = model.get_submodule(spec.decoder) if spec.decoder else model
    return decoder.get_submodule(spec.layers)


def _x(width: int = 64) -> torch.Tensor:
    return torch.randn(2, 7, width, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_declared_submodules_exist(family, tiny_checkpoint):
    spec = get_family(family)
    blocks = load_blocks(tiny_checkpoint(family), [0])
    layer = blocks.layers[0]
    layer.get_submodule(spec.attn)
    for name in spec.mlp:
        layer.get_submodule(name)
    params = dict(layer.named_parameters())
    assert spec.residual_out and all(name in params for name in spec.residual_out)
    assert (blocks.rotary is not None) == (spec.positions == "rotary")
    for target in ("attention", "mlp"):
        targets = lora_target_modules(blocks, target) + lora_target_parameters(blocks, target)
        assert targets, f"{family}: no LoRA targets for {target}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_norm_tuning_opens_only_norm_parameters(family, tiny_checkpoint):
    blocks = load_blocks(tiny_checkpoint(family), [0, 1], tune="norm")
    norm_params = {id(p) for m in blocks.modules() if is_norm_module(m) for p in m.parameters(recurse=False)}
    trainable = blocks.trainable_parameters()
    assert all(id(p) in norm_params for p in trainable)
    assert {id(p) for p in trainable} == norm_params  # OLMo's and nanochat's norms have no weights: empty
    undetected = {type(m).__name__ for m in blocks.modules() if "Norm" in type(m).__name__ and not is_norm_module(m)}
    assert not undetected - {"UnitRMSNorm"}, f"norm classes not recognised: {undetected}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_expand_is_identity_at_init_where_the_layer_is_pre_norm(family, tiny_checkpoint):
    spec = get_family(family)
    folder = tiny_checkpoint(family)
    if spec.encoder:  # BERT-style post-norm layers: a zeroed copy is not the identity, and expand says so
        with pytest.raises(ValueError, match="pre-norm"):
            load_blocks(folder, [1], tune="expand")
        return
    base = load_blocks(folder, [1, 2])
    exp = load_blocks(folder, [1, 2], tune="expand").eval()
    with torch.no_grad():
        torch.testing.assert_close(exp(_x()), base(_x()), atol=1e-6, rtol=0)
    assert {n.split(".")[1] for n, p in exp.named_parameters() if p.requires_grad} == {"1", "3"}


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """`trained_checkpoint(family)` -> (folder, layer-0 parameters): the tiny model with every parameter moved far
    from its init (x -2.5 + 0.3: norms no longer 1, biases no longer 0, weights off-scale), as pretraining would,
    so a re-initialised layer is told apart from a loaded one."""
    cache = {}

    def make(family):
        if family not in cache:
            model = build_tiny_model(family)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(-2.5).add_(0.3)
            folder = tmp_path_factory.mktemp(f"trained-{family}")
            model.save_pretrained(folder)
            layer = _stack(model, family)[0]
            cache[family] = folder, {n: p.detach().clone() for n, p in layer.named_parameters()}
        return cache[family]

    return make


@pytest.mark.parametrize(
    "family",
    FAMILY_NAMES,
)
def test_random_control_reinitialises_with_the_family_init(family, trained_checkpoint):
    """tune="random": every parameter of the layer differs from the checkpoint's and follows the family's own init,
    as `transformers` draws it for a fresh model (another seed): the same constants (norm weights, zero biases)
    and, for random tensors, the same mean and std up to sampling error."""
    folder, trained = trained_checkpoint(family)
    blocks = load_blocks(folder, [0], tune="random", seed=0)
    fresh = _stack(build_tiny_model(family, seed=1), family)[0]
    expected = dict(fresh.named_parameters())
    ours = dict(blocks.layers[0].named_parameters())
    assert ours.keys() == expected.keys() == trained.keys()
    with torch.no_grad():
        for name, p in ours.items():
            ref = expected[name]
            assert not torch.allclose(p, trained[name]), f"{family}.{name} still holds the checkpoint's values"
            if ref.numel() == 1 or ref.std() == 0:
                assert torch.equal(p, ref), f"{family}.{name}: {p.flatten()[:4]} vs the init's {ref.flatten()[:4]}"
                continue
            n, std = ref.numel(), ref.std().item()
            # two independent samples of one distribution: std to ~sqrt(1 / n), mean to ~std * sqrt(2 / n) (5 sigma)
            assert abs(p.std().item() / std - 1) < 5 * n**-0.5, f"{family}.{name}: std {p.std():.4g} vs {std:.4g}"
            assert abs(p.mean().item() - ref.mean().item()) < 5 * std * (2 / n) ** 0.5, f"{family}.{name}: mean"
        assert torch.isfinite(blocks(_x())).all()


def test_family_lookup_normalises_names():
    from mmblocks.llm import get_family

    assert get_family("gpt_sw3").model_type == "gpt-sw3"
    assert get_family("xlm_roberta").encoder

"""The training switches do what the README says: accumulation equals one large batch, gradient checkpointing
recomputes the blocks and leaves the gradients as they were, bf16 autocast computes in bf16, ``torch.compile``
trains the same model. Each compares two short runs of the same seed and data (digits, one reading slot, no
augmentation or drop-path, so that the sample stream is the same whatever the batching)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmblocks.data import make_dataset
from mmblocks.recipes import build_trainer
from mmblocks.train import latest_checkpoint

CONFIG = "configs/image/digits_vit_tiny_smollm2.yaml"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_dataset("digits", root, seed=0, progress=False)
    return root


def _overrides(root: Path, out: Path, llm: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        f"train.out_dir={out}",
        "data.num_workers=0",
        "data.augment=false",
        "model.backbone.depth=2",
        "model.backbone.embed_dim=32",
        "model.backbone.num_heads=2",
        "model.backbone.patch_size=4",
        "model.backbone.drop_path_rate=0.0",
        "model.llm.enabled=true",
        f"model.llm.source={llm}",
        "model.llm.layers=[-1]",
        "data.val_split=null",
        "data.test_split=null",
        "train.max_steps=3",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.grad_clip=1000.0",  # large: the logged pre-clip norm is the raw gradient norm, nothing is clipped
        "train.tensorboard=false",
        "train.progress=false",
        "train.log_every=1",
        *extra,
    ]


def _fit(root: Path, out: Path, llm: Path, *extra: str, callbacks=()) -> tuple[dict[str, torch.Tensor], list[dict]]:
    trainer = build_trainer(CONFIG, _overrides(root, out, llm, *extra), callbacks=callbacks)
    trainer.fit()
    weights = load_file(str(latest_checkpoint(out / "checkpoints") / "model.safetensors"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, [r for r in rows if r["split"] == "train"]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst:.3g} (> {atol:g})"


def test_accumulation_equals_one_large_batch(digits, tmp_path, tiny_checkpoint):
    """2 x 32 with accum_steps=2 is the step of one batch of 64: the same raw gradient norm at every step (the
    micro-batch losses are divided by the accumulation, so the summed gradient is the large batch's mean) and the
    same weights after 3 AdamW steps."""
    llm = tiny_checkpoint("llama")
    big, big_rows = _fit(digits, tmp_path / "big", llm, "data.batch_size=64")
    acc, acc_rows = _fit(digits, tmp_path / "acc", llm, "data.batch_size=32", "train.accum_steps=2")
    assert len(big_rows) == len(acc_rows) == 3
    for b, a in zip(big_rows, acc_rows, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # AdamW divides by sqrt(v), so an entry whose gradient is mostly float rounding (a different summation order in
    # two half batches) can move by a visible fraction of lr: 1.4e-5 was seen on one thread, under 1e-5 on two
    _assert_close(acc, big, atol=5e-5)


def test_grad_checkpointing_recomputes_and_keeps_the_gradients(digits, tmp_path, tiny_checkpoint):
    llm = tiny_checkpoint("llama")
    calls = {"backbone": 0, "llm": 0}

    def count(trainer, step):  # registered once, after the first step; pre-hooks, since a recompute stops early
        if step == 1 and not calls.get("hooked"):
            calls["hooked"] = True
            for name, module in (
                ("backbone", trainer.model.backbone.blocks[0]),
                ("llm", trainer.model.llm_stage.blocks.layers[0]),
            ):
                module.register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))

    plain, plain_rows = _fit(digits, tmp_path / "plain", llm, "data.batch_size=64", callbacks=[count])
    once = dict(calls)
    calls.update(backbone=0, llm=0, hooked=False)
    ckpt, ckpt_rows = _fit(
        digits, tmp_path / "ckpt", llm, "data.batch_size=64", "train.grad_checkpointing=true", callbacks=[count]
    )
    # steps 2 and 3 after the hooks: one forward each without checkpointing, forward + recompute with it
    assert (once["backbone"], once["llm"]) == (2, 2)
    assert (calls["backbone"], calls["llm"]) == (4, 4)
    for p, c in zip(plain_rows, ckpt_rows, strict=True):
        assert c["grad_norm"] == pytest.approx(p["grad_norm"], rel=1e-6)
    _assert_close(ckpt, plain, atol=1e-6)


def test_bf16_autocast_computes_in_bf16_and_stays_near_fp32(digits, tmp_path, tiny_checkpoint):
    llm = tiny_checkpoint("llama")
    dtypes: list[torch.dtype] = []

    def watch(trainer, step):
        if step == 1 and not dtypes:
            trainer.model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))

    _, fp32_rows = _fit(digits, tmp_path / "fp32", llm, "data.batch_size=64", "train.amp=none")
    bf16, bf16_rows = _fit(digits, tmp_path / "bf16", llm, "data.batch_size=64", "train.amp=bf16", callbacks=[watch])
    assert dtypes and set(dtypes) == {torch.bfloat16}, "the head's matmul runs in bf16 under autocast"
    assert {v.dtype for v in bf16.values()} == {torch.float32}, "the weights stay fp32 (autocast, not a cast)"
    # bf16 has 8 mantissa bits: losses agree to ~1e-2 relative, and differ (the arm is not secretly fp32)
    losses = [(a["loss"], b["loss"]) for a, b in zip(fp32_rows, bf16_rows, strict=True)]
    assert all(b == pytest.approx(a, rel=2e-2) for a, b in losses)
    assert any(a != b for a, b in losses)


@pytest.mark.slow
def test_compile_trains_the_same_model(digits, tmp_path, tiny_checkpoint):
    """``train.compile=true`` (inductor on CPU): the same losses and weights as eager within fp32 reassociation."""
    llm = tiny_checkpoint("llama")
    eager, eager_rows = _fit(digits, tmp_path / "eager", llm, "data.batch_size=64")
    compiled, compiled_rows = _fit(digits, tmp_path / "compiled", llm, "data.batch_size=64", "train.compile=true")
    for e, c in zip(eager_rows, compiled_rows, strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4)
    _assert_close(compiled, eager, atol=1e-4)

"""Checkpoints: lossless round trip, atomic writes, pruning, weights-only loading and clear errors."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmblocks.train import checkpoint as ckpt
from mmblocks.train.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from mmblocks.train.schedule import build_scheduler, param_groups


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    model[0].requires_grad_(False)  # a frozen part that must not be saved
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-2)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=3, min_lr_ratio=0.1)
    return model, opt, sched


def _train(model, opt, sched, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save(tmp: Path, step: int, **kw) -> Path:
    model, opt, sched = _setup()
    return save_checkpoint(tmp, step, model_state=_trainable(model), optimizer=opt, scheduler=sched, **kw)


def test_round_trip_weights_optimizer_scheduler_rng(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 4)
    path = save_checkpoint(
        tmp_path,
        4,
        model_state=_trainable(model),
        optimizer=opt,
        scheduler=sched,
        data_state={"samples_seen": 20, "epoch": 0, "shard": np.int64(3)},
        extra={"config": {"lr": 1e-2}, "best_loss": float("nan")},
    )
    # the draws right after saving are what a resumed run must draw next
    expected = (torch.rand(3), random.random(), np.random.rand(2))

    assert path == tmp_path / "step-00000004"
    assert sorted(p.name for p in path.iterdir()) == sorted(ckpt.CHECKPOINT_FILES)
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    assert set(load_file(path / "model.safetensors")) == {"1.weight", "1.bias", "2.weight", "2.bias"}

    # scramble everything, then resume into fresh objects
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    model2, opt2, sched2 = _setup()  # same frozen weights (reloaded from their source in real runs) ...
    with torch.no_grad():
        for p in _trainable(model2).values():  # ... but different trainable ones
            p.add_(1.0)
    out = load_checkpoint(tmp_path, optimizer=opt2, scheduler=sched2)
    got = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])

    assert out["step"] == 4 and out["path"] == path
    assert out["data_state"] == {"samples_seen": 20, "epoch": 0, "shard": 3}
    assert out["extra"] == {"config": {"lr": 1e-2}, "best_loss": None}
    missing, unexpected = model2.load_state_dict(out["model_state"], strict=False)
    assert unexpected == [] and set(missing) == {"0.weight", "0.bias"}
    for name, p in _trainable(model).items():
        assert torch.equal(dict(model2.named_parameters())[name], p)
    assert sched2.state_dict() == sched.state_dict()
    assert sched2.get_last_lr() == sched.get_last_lr()
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k, st in s1["state"].items():
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[field], s2["state"][k][field])

    # resumed training continues exactly like uninterrupted training
    _train(model, opt, sched, 3, seed=9)
    _train(model2, opt2, sched2, 3, seed=9)
    for name, p in _trainable(model).items():
        assert torch.equal(dict(model2.named_parameters())[name], p)


def test_bf16_shared_and_non_contiguous_tensors(tmp_path):
    w = torch.randn(6, 4, dtype=torch.bfloat16)
    state = {"w": w, "tied": w, "t": w.t(), "half": w[:3], "other_half": w[3:], "empty": torch.empty(0)}
    path = save_checkpoint(tmp_path, 0, model_state=state)
    loaded = load_checkpoint(path, restore_rng=False)["model_state"]
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert state["w"].data_ptr() == w.data_ptr()  # the caller's tensors are untouched


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: would check that bf16 CUDA weights and the per-device CUDA RNG states round-trip (the CPU "
    "counterparts are test_bf16_shared_and_non_contiguous_tensors and test_rng_helpers_round_trip)",
)
def test_cuda_tensors_and_cuda_rng(tmp_path):
    model = nn.Linear(4, 4).cuda().to(torch.bfloat16)
    torch.cuda.manual_seed_all(5)
    path = save_checkpoint(tmp_path, 1, model_state=dict(model.state_dict()))
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(6)
    out = load_checkpoint(path, map_location="cuda")
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    assert out["model_state"]["weight"].device.type == "cuda"
    assert torch.equal(out["model_state"]["weight"], model.weight)


def test_rng_helpers_round_trip():
    state = capture_rng()
    a = (torch.randn(4), random.random(), random.gauss(0, 1), np.random.randn(3))
    restore_rng(state)
    b = (torch.randn(4), random.random(), random.gauss(0, 1), np.random.randn(3))
    assert torch.equal(a[0], b[0]) and a[1:3] == b[1:3] and np.array_equal(a[3], b[3])


def test_crash_during_rename_keeps_previous_latest(tmp_path, monkeypatch):
    first = _save(tmp_path, 10)
    real_replace = os.replace

    def crash(src, dst):
        if Path(dst).name == "step-00000020":
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 20)
    monkeypatch.undo()

    assert not (tmp_path / "step-00000020").exists()
    assert latest_checkpoint(tmp_path) == first
    assert load_checkpoint(tmp_path, restore_rng=False)["step"] == 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # cleaned up on the error


def test_crash_mid_write_and_killed_process_leftovers(tmp_path, monkeypatch):
    first = _save(tmp_path, 10)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the optimizer state is written

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 20)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first

    # what a SIGKILL could leave behind: a temp folder and a pointer write that never happened; plus a foreign,
    # incomplete step folder. None of them is taken for a checkpoint.
    junk = tmp_path / ".tmp-step-00000030-abc"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    partial = tmp_path / "step-00000040"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == first
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == first  # fallback: the highest *complete* step folder
    assert list_checkpoints(tmp_path) == [first]

    # the next save removes the temp folder
    _save(tmp_path, 50)
    assert not junk.exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000050"


def test_crash_before_pointer_update(tmp_path, monkeypatch):
    first = _save(tmp_path, 10)
    monkeypatch.setattr(ckpt, "_write_bytes_atomic", lambda *a: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        _save(tmp_path, 20)
    monkeypatch.undo()
    # the new folder is complete but the pointer still names the old one: a consistent state either way
    assert (tmp_path / "step-00000020" / "state.json").is_file()
    assert latest_checkpoint(tmp_path) == first


def test_prune_keeps_newest_and_never_the_latest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    # a run resumed from an older step: the new latest is kept even though it is not among the highest steps
    _save(tmp_path, 3, keep=1)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000003"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000005"]
    _save(tmp_path, 6, keep=None)
    assert len(list_checkpoints(tmp_path)) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_resave_same_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 7, model_state={"w": torch.zeros(2)})
    save_checkpoint(tmp_path, 7, model_state={"w": torch.ones(2)})
    out = load_checkpoint(tmp_path, restore_rng=False)
    assert torch.equal(out["model_state"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("latest")] == ["step-00000007"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_object_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    torch.save({"state": {}, "param_groups": [], "payload": Evil()}, path / "optimizer.pt")
    # keep the recorded size consistent so the refusal comes from the weights-only loader itself
    state = json.loads((path / "state.json").read_text())
    state["files"]["optimizer.pt"] = (path / "optimizer.pt").stat().st_size
    (path / "state.json").write_text(json.dumps(state))
    _, opt, _ = _setup()
    with pytest.raises(CheckpointError, match=r"optimizer\.pt.*not a weights-only file"):
        load_checkpoint(path, optimizer=opt)


def test_unsafe_state_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"scheduler\['fn'\].*weights_only"):
        save_checkpoint(tmp_path, 1, model_state={}, scheduler={"fn": Evil()})
    with pytest.raises(TypeError, match=r"data_state\['x'\]"):
        save_checkpoint(tmp_path, 1, model_state={}, data_state={"x": object()})
    with pytest.raises(TypeError, match=r"model_state\['w'\] must be a Tensor"):
        save_checkpoint(tmp_path, 1, model_state={"w": [1.0]})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_clear_errors_for_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError, match=r"state\.json"):
        load_checkpoint(tmp_path)  # an empty directory

    path = _save(tmp_path, 1)
    model_file = path / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_checkpoint(path)

    path = _save(tmp_path, 2)
    (path / "scheduler.pt").unlink()
    _, _, sched = _setup()
    with pytest.raises(CheckpointNotFoundError, match=r"scheduler\.pt"):
        load_checkpoint(path, scheduler=sched)

    path = _save(tmp_path, 3)
    model_file = path / "model.safetensors"
    size = model_file.stat().st_size
    model_file.write_bytes(b"\xff" * size)  # same size, garbage content
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
        load_checkpoint(path)

    path = _save(tmp_path, 4)
    (path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"state\.json.*not valid JSON"):
        load_checkpoint(path)


def test_checkpoint_without_optimizer_cannot_restore_one(tmp_path):
    path = save_checkpoint(tmp_path, 0, model_state={"w": torch.ones(1)})
    _, opt, _ = _setup()
    with pytest.raises(CheckpointNotFoundError, match=r"optimizer\.pt"):
        load_checkpoint(path, optimizer=opt)


def test_optimizer_mismatch_is_a_clear_error(tmp_path):
    path = _save(tmp_path, 1)
    other = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-3)  # one group instead of two
    with pytest.raises(CheckpointError, match=r"optimizer\.pt does not match the AdamW"):
        load_checkpoint(path, optimizer=other)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, model_state={})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, model_state={}, keep=0)
    assert latest_checkpoint(tmp_path / "missing") is None

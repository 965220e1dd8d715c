"""End to end: train from a config on real shards, resume exactly, DDP on 2 CPU processes, eval, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmblocks.cli import main as cli_main
from mmblocks.recipes import build_trainer, evaluate_checkpoint
from mmblocks.train import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from mmblocks.data import make_dataset

    root = tmp_path_factory.mktemp("digits")
    make_dataset("digits", root, seed=0)
    return root


def _tiny_overrides(root: Path, out: Path, llm_source: Path | None) -> list[str]:
    o = [
        f"data.root={root}",
        f"train.out_dir={out}",
        "data.channels=1",
        "data.image_size=16",
        "model.backbone.img_size=16",
        "model.backbone.patch_size=4",
        "model.backbone.depth=2",
        "model.backbone.embed_dim=32",
        "model.backbone.num_heads=2",
        "model.backbone.drop_path_rate=0.1",
        "data.batch_size=256",
        "data.num_workers=2",
        "data.augment=true",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.tensorboard=false",
        "train.progress=false",
        "train.log_every=1",
        "train.seed=7",
    ]
    if llm_source is not None:
        o += ["model.llm.enabled=true", f"model.llm.source={llm_source}", "model.llm.layers=[-1]"]
    return o


class _Kill(Exception):
    pass


def _kill_at(step: int):
    def cb(trainer, s):
        if s == step:
            raise _Kill(f"killed at step {s}")

    return cb


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, digits_root, tiny_checkpoint):
    """Killed after the step-3 checkpoint (mid-epoch, 2 workers, augmentation and drop-path on), then resumed: the
    final weights equal those of a run that was never interrupted, across an epoch boundary."""
    llm = tiny_checkpoint("llama")
    steps = ["train.max_steps=8", "train.checkpoint_every=3"]
    full = build_trainer(
        "configs/image/digits_vit_tiny_smollm2.yaml", _tiny_overrides(digits_root, tmp_path / "a", llm) + steps
    )
    assert full.steps_per_epoch == len(full.train_loader) < 8, "the run crosses an epoch boundary"
    full.fit()
    overrides = _tiny_overrides(digits_root, tmp_path / "b", llm) + steps
    with pytest.raises(_Kill):
        build_trainer("configs/image/digits_vit_tiny_smollm2.yaml", overrides, callbacks=[_kill_at(4)]).fit()
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000003"
    resumed = build_trainer("configs/image/digits_vit_tiny_smollm2.yaml", overrides, resume=True)
    resumed.fit()
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert not any(".llm_stage.blocks." in k for k in a), "frozen LLM weights are not saved"


def test_training_learns_and_writes_everything(tmp_path, digits_root):
    run = tmp_path / "run"
    summary = build_trainer(
        "configs/image/digits_vit_tiny.yaml",
        [
            *_tiny_overrides(digits_root, run, None),
            "train.epochs=4",
            "data.batch_size=32",
            "train.tensorboard=true",
            "data.augment=false",
            "model.backbone.embed_dim=64",
            "model.backbone.num_heads=4",
            "model.backbone.drop_path_rate=0.0",
            "train.warmup_steps=10",
        ],
    ).fit()
    assert summary["steps"] == 4 * 40 and summary["test"]["samples"] == 270
    assert summary["test"]["acc"] > 0.4, "4 epochs of a tiny ViT on digits beat chance (0.1) clearly"
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "report/report.json",
        "report/report.md",
        "report/loss.png",
        "report/accuracy.png",
    ):
        assert (run / f).is_file(), f
    assert any((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert {"loss", "acc", "lr", "samples_per_s", "data_time", "step_time"} <= set(train_records[-1])
    assert sum(r["split"] == "val" for r in records) == 4


def test_eval_cli_reads_the_checkpoint(tmp_path, digits_root, capsys):
    run = tmp_path / "run"
    overrides = [*_tiny_overrides(digits_root, run, None), "train.max_steps=3", "train.epochs=1"]
    build_trainer("configs/image/digits_vit_tiny.yaml", overrides).fit()
    capsys.readouterr()
    code = cli_main(
        ["eval", "configs/image/digits_vit_tiny.yaml", *overrides, "--checkpoint", str(run / "checkpoints")]
    )
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads(printed[printed.index("{\n") :])
    assert results["test"]["samples"] == 270 and 0.0 <= results["test"]["acc"] <= 1.0
    final = json.loads((run / "summary.json").read_text())["test"]
    assert results["test"]["acc"] == pytest.approx(final["acc"]), "the checkpoint reproduces the run's own test"
    written = run / "eval" / latest_checkpoint(run / "checkpoints").name  # the default --out: beside the run
    assert json.loads((written / "metrics.json").read_text()) == results
    assert (written / "confusion_test.json").is_file() and "Confusion" in (written / "eval.md").read_text()
    step = latest_checkpoint(run / "checkpoints")
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        (step / name).unlink()  # evaluation reads the weights only
    again = evaluate_checkpoint("configs/image/digits_vit_tiny.yaml", step, overrides, splits=("test",))
    assert again["test"]["acc"] == pytest.approx(final["acc"]) and set(again) == {"test"}


def test_ddp_two_cpu_processes(tmp_path, digits_root):
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "mmblocks",
        "train",
        "configs/image/digits_vit_tiny.yaml",
        *_tiny_overrides(digits_root, run, None),
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "data.batch_size=64",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["test"]["samples"] == 270, "every test sample counted exactly once over the two ranks"
    confusion = json.loads((run / "report" / "confusion_test.json").read_text())["confusion"]
    assert sum(map(sum, confusion)) == 270, "the confusion matrix is summed over the ranks too"
    assert latest_checkpoint(run / "checkpoints").name == "step-00000004"
    assert proc.stdout.count("test accuracy") == 1, "the result line is printed by rank 0 only"


def test_demo_quick(tmp_path):
    data = __import__("mmblocks.demo", fromlist=["run_demo"]).run_demo(quick=True, out=tmp_path / "demo")
    group = data["groups"][0]
    assert [r["arm"] for r in group["arms"]] == ["baseline", "frozen", "shuffled"]
    assert not group["failed"]
    assert all("one seed has no interval, so it cannot decide" in s for s in group["sentences"])
    runs = tmp_path / "demo" / "runs" / "textures_vit_tiny_smollm2" / "default"
    summaries = {arm: json.loads((runs / arm / "seed0" / "summary.json").read_text()) for arm in ("baseline", "frozen")}
    assert summaries["baseline"]["frozen_params"] == 0 and summaries["frozen"]["frozen_params"] > 0
    assert (tmp_path / "demo" / "study.md").read_text().count("|") > 10


def test_config_errors_from_the_cli(capsys):
    assert cli_main(["train", "configs/image/digits_vit_tiny.yaml", "model.llm.tune=freeze"]) == 2
    assert "model.llm.tune: 'freeze' is not one of" in capsys.readouterr().err

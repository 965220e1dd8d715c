"""The Trainer as a library: built objects in, no config; callbacks; the checkpoint-weights loader's errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmblocks.data import build_loader, make_dataset
from mmblocks.models import MMEncoder, create_backbone
from mmblocks.tasks import ClassificationTask
from mmblocks.train import (
    Callback,
    SoftMaskCallback,
    Trainer,
    TrainSettings,
    evaluate,
    latest_checkpoint,
    load_trainable_weights,
    trainable_state_dict,
)
from mmblocks.train.checkpoint import CheckpointNotFoundError, WeightsMismatchError


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_dataset("digits", root, seed=0, progress=False)
    return root


def _parts(digits: Path, task: ClassificationTask, width: int = 32):
    torch.manual_seed(0)
    backbone = create_backbone(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=width, num_heads=2, in_chans=1
    )
    model = MMEncoder(backbone.make_tokenizer(), backbone, None, task.build_head(width))
    kw = dict(batch_size=64, image_size=16, channels=1, num_workers=0, fields=task.fields)
    loaders = {split: build_loader(digits, split, shuffle=split == "train", **kw) for split in ("train", "val", "test")}
    return model, loaders


class _Recorder(Callback):
    def __init__(self):
        self.events: list[tuple] = []

    def on_fit_start(self, trainer):
        self.events.append(("fit_start", trainer.step))

    def on_step_start(self, trainer):
        self.events.append(("step_start", trainer.step))
        return {"probe": float(trainer.step)}

    def on_step_end(self, trainer, step):
        self.events.append(("step_end", step))

    def on_epoch_end(self, trainer, epoch, val):
        self.events.append(("epoch_end", epoch, sorted(val)))

    def on_fit_end(self, trainer, summary):
        self.events.append(("fit_end", summary["steps"]))


def test_trainer_from_objects_with_callbacks(digits, tmp_path):
    task = ClassificationTask(10, class_names=[str(i) for i in range(10)])
    model, loaders = _parts(digits, task)
    recorder = _Recorder()
    trainer = Trainer(
        model,
        task,
        loaders["train"],
        val_loader=loaders["val"],
        test_loader=loaders["test"],
        callbacks=[recorder],
        out_dir=str(tmp_path),
        max_steps=3,
        epochs=1,
        lr=3e-3,
        warmup_steps=1,
        log_every=1,
        tensorboard=False,
        progress=False,
        files={"note.txt": "hello"},
        run_info={"name": "library-run"},
    )
    assert isinstance(trainer.callbacks[0], SoftMaskCallback), "the default callbacks run first"
    summary = trainer.fit()
    assert summary["name"] == "library-run" and summary["steps"] == 3 and summary["test"]["samples"] == 270
    assert {"acc", "acc5", "mean_per_class_recall", "loss"} <= set(summary["test"])
    assert summary["best_val"]["step"] == 3 and "val_acc" in summary["best_val"]
    assert recorder.events == [
        ("fit_start", 0),
        *[e for s in range(3) for e in (("step_start", s), ("step_end", s + 1))],
        ("epoch_end", 0, ["acc", "acc5", "loss", "lost", "mean_per_class_recall", "samples"]),
        ("fit_end", 3),
    ]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["probe"] for r in rows if r["split"] == "train"] == [0.0, 1.0, 2.0], "on_step_start values are logged"
    assert (tmp_path / "note.txt").read_text() == "hello"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Confusion matrix (test)" in report and (tmp_path / "report" / "confusion_test.png").is_file()
    confusion = json.loads((tmp_path / "report" / "confusion_test.json").read_text())["confusion"]
    assert sum(map(sum, confusion)) == 270

    # the free `evaluate` gives the same numbers from the saved weights
    fresh, fresh_loaders = _parts(digits, task)
    load_trainable_weights(fresh, latest_checkpoint(tmp_path / "checkpoints"))
    again, _ = evaluate(fresh, task, fresh_loaders["test"])
    assert again["acc"] == summary["test"]["acc"] and again["loss"] == pytest.approx(summary["test"]["loss"])


def test_settings_are_checked(digits, tmp_path):
    task = ClassificationTask(10)
    model, loaders = _parts(digits, task)
    with pytest.raises(TypeError, match=r"unknown settings \['learning_rate'\]"):
        Trainer(model, task, loaders["train"], out_dir=str(tmp_path), learning_rate=1.0)
    with pytest.raises(ValueError, match="needs out_dir"):
        Trainer(model, task, loaders["train"])
    with pytest.raises(ValueError, match=r"schedule: 'cosin' is not one of"):
        TrainSettings(schedule="cosin")
    with pytest.raises(ValueError, match="accum_steps: must be >= 1"):
        TrainSettings(accum_steps=0)


def test_load_trainable_weights_says_what_does_not_fit(digits, tmp_path):
    task = ClassificationTask(10)
    model, _ = _parts(digits, task)
    state = {k: v.contiguous() for k, v in trainable_state_dict(model).items()}
    save_file(state, tmp_path / "model.safetensors")
    assert sorted(load_trainable_weights(model, tmp_path)) == sorted(state)

    other, _ = _parts(digits, ClassificationTask(7))  # another class count
    with pytest.raises(WeightsMismatchError, match=r"head\.fc\.bias has shape \(10,\), the model \(7,\)"):
        load_trainable_weights(other, tmp_path)
    wider, _ = _parts(digits, task, width=64)
    with pytest.raises(ValueError, match="has shape"):  # also a ValueError
        load_trainable_weights(wider, tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "partial.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"lacks trainable weights of this model, e\.g\. \['head\.fc"):
        load_trainable_weights(model, tmp_path / "partial.safetensors")
    save_file({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"'extra\.weight'.*which this model does not have"):
        load_trainable_weights(model, tmp_path / "extra.safetensors")
    loaded = load_trainable_weights(other, tmp_path / "partial.safetensors", stages=["backbone"])
    assert loaded and all(n.startswith("backbone.") for n in loaded)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="holds no complete checkpoint"):
        load_trainable_weights(model, tmp_path / "empty")

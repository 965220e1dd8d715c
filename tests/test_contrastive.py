"""Contrastive models and training against the field's oracles: open_clip's and CLIP_benchmark's own functions run on
an mmblocks `ContrastiveModel` unchanged and give our harness's numbers; the task's loss is open_clip's `ClipLoss` /
`SigLipLoss` on the model's output; under DDP (2 gloo processes) the local loss with gathered features gives the
gradients of the global loss on the concatenated batch; LiT's cache changes nothing but the cost; held-out classes
never reach the model in training."""

from __future__ import annotations

import json
import math
import os
import socket

import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_classification as zsc
from clip_benchmark.metrics import zeroshot_retrieval as zsr
from data_helpers import short_run
from open_clip.loss import ClipLoss, SigLipLoss
from torch.utils.data import DataLoader, TensorDataset

from mmblocks.builders import build_encoder, build_task
from mmblocks.config import ConfigError, load_config
from mmblocks.data.loader import Batch
from mmblocks.eval import (
    classify,
    evaluate_classification,
    evaluate_retrieval,
    grouped_retrieval_metrics,
    zero_shot_classifier,
)
from mmblocks.heads import ContrastiveHead
from mmblocks.models import ContrastiveModel, create_text_tower
from mmblocks.tasks import ContrastiveTask

CLASSES = ["circle", "square", "triangle", "star", "heart", "moon"]
TEMPLATES = ["a {c}.", "a drawing of a {c}."]


def _cfg(**task) -> dict:
    return {
        "task": {"name": "contrastive", "text": "class", "classnames": CLASSES, "templates": TEMPLATES, **task},
        "model": {
            "backbone": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1},
            "text_tower": {"name": "minilm"},
            "head": {"name": "contrastive", "embed_dim": 32},
        },
        "data": {"image_size": 16, "root": "/nonexistent"},
    }


@pytest.fixture(scope="module")
def minilm():
    return create_text_tower("minilm")


@pytest.fixture()
def encoder_and_task(minilm, monkeypatch):
    import mmblocks.builders as builders

    monkeypatch.setattr(builders, "create_text_tower", lambda name, **kw: minilm)  # load the tower once per module
    torch.manual_seed(0)
    cfg = load_config(_cfg())
    task = build_task(cfg)
    return build_encoder(cfg, task=task, verbose=False).eval(), task


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


class _Labelled(TensorDataset):
    classes = CLASSES


def test_open_clip_and_clip_benchmark_run_on_the_model_unchanged(encoder_and_task):
    encoder, _ = encoder_and_task
    model = ContrastiveModel(encoder).eval()
    tok = model.tokenizer
    ours = zero_shot_classifier(model, tok, CLASSES, TEMPLATES, batch_size=5)
    theirs = zsc.zero_shot_classifier(model, tok, CLASSES, TEMPLATES, "cpu", amp=False)
    positional = [t.replace("{c}", "{}") for t in TEMPLATES]
    batched = open_clip.build_zero_shot_classifier(model, tok, CLASSES, positional, num_classes_per_batch=4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, batched, rtol=0, atol=1e-6)

    y = torch.arange(24) % len(CLASSES)
    loader = DataLoader(_Labelled(_images(24), y), batch_size=8)
    logits, target = zsc.run_classification(model, theirs, loader, "cpu", amp=False)
    ours_logits, ours_target = classify(model, ours, loader)
    torch.testing.assert_close(ours_logits, logits, rtol=0, atol=1e-4)
    assert torch.equal(ours_target, target)

    captions = [[f"a {CLASSES[i % 6]} number {i}", f"shape {i}"] for i in range(24)]
    pairs = [(x, captions[i * 8 : i * 8 + 8]) for i, (x, _) in enumerate(loader)]
    theirs_r = zsr.evaluate(model, pairs, tok, "cpu", amp=False, recall_k_list=[1, 5])
    assert evaluate_retrieval(model, pairs, tok, recall_k=(1, 5)) == pytest.approx(theirs_r, abs=1e-9)

    # forward is open_clip's CLIP.forward: normalised features, the scale exponentiated
    out = model(image=_images(4), text=tok(["a star", "a moon", "a heart", "a star"]))
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(4))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.encode_modality is not None and model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def _batch(n: int, labels: list[int] | None = None, seed: int = 2) -> Batch:
    labels = labels if labels is not None else [i % len(CLASSES) for i in range(n)]
    return Batch(_images(n, seed), torch.tensor(labels), [f"k{i}" for i in range(n)])


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_training_loss_is_open_clips_on_the_models_output(minilm, loss, monkeypatch):
    import mmblocks.builders as builders

    monkeypatch.setattr(builders, "create_text_tower", lambda name, **kw: minilm)
    cfg = _cfg(loss=loss, templates=["a {c}."])
    if loss == "siglip":
        cfg["model"]["head"].update(init_logit_bias=-10.0, init_logit_scale=math.log(10))
    cfg = load_config(cfg)
    task = build_task(cfg)
    torch.manual_seed(0)
    encoder = build_encoder(cfg, task=task, verbose=False).eval()
    batch = _batch(8)
    step = task.training_step(encoder, batch)

    model = ContrastiveModel(encoder)
    texts = [f"a {CLASSES[int(y)]}." for y in batch.label]
    out = model(image=batch.inputs, text=model.tokenizer(texts))
    if loss == "clip":
        expected = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    else:
        assert out["logit_bias"].item() == -10.0
        expected = SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    torch.testing.assert_close(step.loss, expected, rtol=1e-5, atol=1e-6)
    step.loss.backward()
    assert encoder.head.proj.weight.grad is not None and encoder.head.logit_scale.grad is not None
    assert all(p.grad is None for p in minilm.parameters())  # the locked tower


def test_lit_cache_changes_nothing_but_the_cost(encoder_and_task, minilm, monkeypatch):
    encoder, cached = encoder_and_task
    uncached = ContrastiveTask(text="class", classnames=CLASSES, templates=TEMPLATES, cache_text=False)
    calls = []
    real = type(minilm).forward
    monkeypatch.setattr(type(minilm), "forward", lambda self, ids: calls.append(len(ids)) or real(self, ids))
    batch = _batch(12)
    grads = []
    for task in (cached, uncached):
        encoder.zero_grad()
        torch.manual_seed(5)  # the same template draws
        task.training_step(encoder, batch).loss.backward()
        grads.append(encoder.head.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    distinct, every = calls
    assert distinct == len(cached.cache) <= len(CLASSES) * len(TEMPLATES) and every == 12
    calls.clear()
    torch.manual_seed(5)
    cached.training_step(encoder, batch)
    assert calls == []  # every prompt is cached now


def test_held_out_classes_never_reach_the_model_and_are_scored_apart(minilm, monkeypatch):
    import mmblocks.builders as builders
    from mmblocks.train import evaluate

    monkeypatch.setattr(builders, "create_text_tower", lambda name, **kw: minilm)
    cfg = load_config(_cfg(held_out_classes=["star", "moon"]))
    task = build_task(cfg)
    encoder = build_encoder(cfg, task=task, verbose=False)
    seen_inputs = []
    encoder.register_forward_pre_hook(lambda m, args: seen_inputs.append(args[0].shape[0]))
    batch = _batch(12)  # labels 0..5 twice: star (3) and moon (5) appear twice each
    step = task.training_step(encoder, batch)
    assert seen_inputs == [8] and step.num_samples == 8 and task.dropped == 4
    with pytest.raises(ValueError, match="only held-out classes"):
        task.training_step(encoder, _batch(2, [3, 5]))

    # evaluation scores every sample against all six names; held-out accuracy is its own figure
    results, _ = evaluate(encoder, task, [_batch(12, seed=7), _batch(6, seed=8)])
    assert results["samples"] == 18 and results["candidates"] == 6
    assert {"acc1", "acc5", "mean_per_class_recall", "acc1_held_out", "acc1_seen", "loss"} <= set(results)
    assert results["held_out_candidates"] == 2 and results["acc1_held_out_restricted"] >= results["acc1_held_out"]
    model = ContrastiveModel(encoder).eval()
    pairs = [(b.inputs, b.label) for b in (_batch(12, seed=7), _batch(6, seed=8))]
    oracle = evaluate_classification(model, pairs, model.tokenizer, CLASSES, TEMPLATES)
    assert results["acc1"] == pytest.approx(oracle["acc1"])
    assert results["mean_per_class_recall"] == pytest.approx(oracle["mean_per_class_recall"])


def test_grouped_retrieval_equals_clip_benchmarks_recall_at_k():
    g = torch.Generator().manual_seed(3)
    texts = F.normalize(torch.randn(7, 16, generator=g), dim=-1)
    item_text = torch.tensor([i % 7 for i in range(40)])
    items = F.normalize(texts[item_text] + 1.2 * torch.randn(40, 16, generator=g), dim=-1)
    ours = grouped_retrieval_metrics(items, texts, item_text, recall_k=(1, 2, 5))
    scores = texts @ items.T
    positive = (item_text[None, :] == torch.arange(7)[:, None]).long()  # [texts, items]
    for k in (1, 2, 5):
        image = (zsr.recall_at_k(scores, positive, k) > 0).float().mean().item()
        text = (zsr.recall_at_k(scores.T, positive.T, k) > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(image)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(text)
    assert 0 < ours["text_retrieval_recall@1"] < ours["text_retrieval_recall@5"]
    with pytest.raises(ValueError, match="every text needs"):
        grouped_retrieval_metrics(items, torch.cat([texts, texts[:1]]), item_text)


def test_config_errors_say_what_is_missing(minilm, monkeypatch):
    import mmblocks.builders as builders

    monkeypatch.setattr(builders, "create_text_tower", lambda name, **kw: minilm)
    cfg = _cfg()
    del cfg["model"]["text_tower"]
    with pytest.raises(ConfigError, match=r"model\.text_tower"):
        build_encoder(cfg, verbose=False)
    with pytest.raises(ConfigError, match=r"model\.head: .*init_logit_bias"):
        build_encoder(_cfg(loss="siglip"), verbose=False)
    with pytest.raises(ConfigError, match="not class names"):
        build_task(_cfg(held_out_classes=["hexagon"]))
    with pytest.raises(ConfigError, match=r"task\.text: 'label' is not one of"):
        build_task(_cfg(text="label"))
    classifier = {**_cfg(), "task": {"name": "classification"}, "model": {**_cfg()["model"], "head": {}}}
    with pytest.raises(ConfigError, match=r"model\.text_tower is set but head 'classifier' takes no text tower"):
        build_encoder(classifier, num_classes=3, verbose=False)
    del classifier["model"]["text_tower"]
    with pytest.raises(ValueError, match="contrastive head"):
        ContrastiveModel(build_encoder(classifier, num_classes=3, verbose=False))
    assert isinstance(build_encoder(_cfg(), verbose=False).head, ContrastiveHead)


# ---------------------------------------------------------------------------------------------- DDP, 2 gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Toy(torch.nn.Module):
    """A two-tower toy: linear image and text projections, a logit scale and (SigLIP) a bias."""

    def __init__(self, loss: str):
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt = torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(5, 4, bias=False)
        self.scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-2.0)) if loss == "siglip" else None

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> dict:
        out = {
            "image_features": F.normalize(self.img(x), dim=-1),
            "text_features": F.normalize(self.txt(t), dim=-1),
            "logit_scale": self.scale.exp(),
        }
        return out if self.bias is None else {**out, "logit_bias": self.bias}


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


def _ddp_worker(rank: int, world: int, port: int, loss: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _Toy(loss)
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # averages the gradients over the ranks
        x, t = _global_batch()
        part = slice(rank * 4, rank * 4 + 4)  # each rank its half of the global batch
        ContrastiveTask(loss=loss, text="txt").loss(ddp(x[part], t[part])).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_ddp_local_loss_with_gathered_features_gives_the_global_gradients(loss, tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), loss, out), nprocs=2, join=True)
    ddp_grads = torch.load(out, weights_only=True)

    model = _Toy(loss)
    ContrastiveTask(loss=loss, text="txt").loss(model(*_global_batch())).backward()  # one process, the whole batch
    assert set(ddp_grads) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert model.img.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- mmblocks zeroshot


def test_zeroshot_command_on_a_trained_contrastive_run(digit_shards, tmp_path):
    import yaml

    from mmblocks.cli import main
    from mmblocks.zeroshot_report import load_mmblocks_run

    cfg = {
        "task": {
            "name": "contrastive",
            "text": "class",
            "templates": ["the digit {c}", "{c}"],
            "held_out_classes": ["7", "8"],
        },
        "model": {
            "backbone": {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "depth": 1},
            "text_tower": {"name": "minilm"},
            "head": {"name": "contrastive", "embed_dim": 32},
        },
        "data": {"image_size": 16, "channels": 1, "augment": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", str(path), *short_run(digit_shards, run, steps=3, batch_size=16)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert {"acc1", "acc1_held_out", "acc1_seen", "image_retrieval_recall@1"} <= set(summary["test"])
    assert summary["chance"]["acc1"] == pytest.approx(0.1)

    out = tmp_path / "zs"
    argv = ["zeroshot", "--model", f"mmblocks:{run}", "--data", str(digit_shards), "--out", str(out)]
    assert main([*argv, "--workers", "0"]) == 0
    report = json.loads((out / "zeroshot.json").read_text())
    assert report["templates"] == ["the digit {c}", "{c}"] and report["modality"] == "image"
    # the same numbers as the run's own test evaluation (the same weights, prompts and samples)
    assert report["metrics"]["acc1"] == pytest.approx(summary["test"]["acc1"])
    assert report["metrics"]["mean_per_class_recall"] == pytest.approx(summary["test"]["mean_per_class_recall"])
    zs = load_mmblocks_run(run, digit_shards)
    assert isinstance(zs.model, ContrastiveModel) and zs.weights.endswith(".safetensors")
    assert main([*argv, "--task", "retrieval", "--out", str(tmp_path / "zr"), "--workers", "0"]) == 2  # no txt


def test_motion_metric_parses_the_best_caption_against_the_clips_own():
    from mmblocks.data.moving_digits import caption
    from mmblocks.tasks import ContrastiveMetrics

    texts = [caption(3, 0), caption(3, 2), caption(5, 0), caption(5, 2)]
    emb = torch.eye(4)
    metrics = ContrastiveMetrics(torch.device("cpu"), recall_k=(1,), metrics=("motion",))
    metrics.texts = dict(zip(texts, emb))
    # four clips of "3 moving E" etc.; the features pick: right, wrong direction, wrong digit, both wrong
    truth, picked = [0, 1, 2, 3], [0, 0, 0, 0]
    metrics.add(torch.tensor(0.0), emb[picked], [texts[i] for i in truth], [False, True, False, True])
    metrics.sync()
    out = metrics.compute()
    assert out["digit_acc"] == 0.5 and out["direction_acc"] == 0.5 and out["motion_acc"] == 0.25
    assert out["digit_acc_held_out"] == 0.5 and out["direction_acc_held_out"] == 0.0  # clips 1 and 3
    with pytest.raises(ValueError, match="motion metric reads"):
        ContrastiveTask(text="class", classnames=CLASSES, metrics=["motion"])

"""Zero-shot classification and retrieval against the field's oracles: CLIP_benchmark's own functions (installed with
--no-deps in the dev set-up), open_clip's classifier builders and open_clip_train's retrieval metrics, on a tiny
random open_clip CLIP (nothing downloaded)."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification as zsc  # the oracle: `make install` puts it in the dev venv
from clip_benchmark.metrics import zeroshot_retrieval as zsr
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mmblocks.data.loader import Batch
from mmblocks.eval import (
    classification_metrics,
    classify,
    evaluate_classification,
    evaluate_retrieval,
    fill_template,
    retrieval_metrics,
    zero_shot_classifier,
)

CLASSES = ["zero", "one", "two", "three", "four", "five", "six"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the number {c}.", "{c}"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return model, tokenizer


class _Labelled(TensorDataset):
    classes = CLASSES  # CLIP_benchmark reads dataset.classes


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_classifier_equals_clip_benchmark_and_open_clip(clip):
    model, tok = clip
    ours = zero_shot_classifier(model, tok, CLASSES, TEMPLATES, batch_size=5)  # prompts of several classes per batch
    theirs = zsc.zero_shot_classifier(model, tok, CLASSES, TEMPLATES, "cpu", amp=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    positional = [t.replace("{c}", "{}") for t in TEMPLATES]  # open_clip's templates fill a positional slot
    legacy = open_clip.build_zero_shot_classifier_legacy(model, tok, CLASSES, positional)
    batched = open_clip.build_zero_shot_classifier(model, tok, CLASSES, positional, num_classes_per_batch=3)
    torch.testing.assert_close(ours, legacy, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, batched, rtol=0, atol=1e-6)
    assert ours.shape == (32, len(CLASSES))
    torch.testing.assert_close(ours.norm(dim=0), torch.ones(len(CLASSES)))


def test_cupl_class_specific_prompts_equal_clip_benchmark(clip):
    model, tok = clip
    cupl = {c: [f"a {c} written in ink", f"the digit {c}"] + [f"number {c}"] * (i % 2) for i, c in enumerate(CLASSES)}
    ours = zero_shot_classifier(model, tok, CLASSES, cupl, batch_size=4)
    theirs = zsc.zero_shot_classifier(model, tok, CLASSES, cupl, "cpu", amp=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_classes", [7, 3])  # acc5 is NaN below 5 classes, as in CLIP_benchmark
def test_classification_equals_clip_benchmark(clip, n_classes, monkeypatch):
    model, tok = clip
    classes = CLASSES[:n_classes]
    x = _images(40)
    y = torch.randint(0, n_classes, (40,), generator=torch.Generator().manual_seed(2))
    data = _Labelled(x, y)
    data.classes = classes
    loader = DataLoader(data, batch_size=16)
    ours = evaluate_classification(model, loader, tok, classes, TEMPLATES)
    # CLIP_benchmark's pipeline up to the logits and its documented metric definitions, then its whole `evaluate`
    clf = zsc.zero_shot_classifier(model, tok, classes, TEMPLATES, "cpu", amp=False)
    logits, target = zsc.run_classification(model, clf, loader, "cpu", amp=False)
    ours_logits, ours_target = classify(model, zero_shot_classifier(model, tok, classes, TEMPLATES), loader)
    torch.testing.assert_close(ours_logits, logits, rtol=0, atol=1e-4)
    assert torch.equal(ours_target, target)
    pred = logits.topk(min(5, n_classes), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    expected_acc5 = correct[:5].reshape(-1).float().sum().item() / len(target) if n_classes >= 5 else math.nan
    from sklearn.metrics import balanced_accuracy_score

    assert ours["acc1"] == pytest.approx(correct[:1].reshape(-1).float().sum().item() / len(target))
    assert ours["acc5"] == pytest.approx(expected_acc5, nan_ok=True)
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(target, logits.argmax(1)))

    # the whole oracle, with its `accuracy` helper's float() of a 1-element array (an error under NumPy 2) made a
    # .item(): the same count
    monkeypatch.setattr(zsc, "accuracy", lambda o, t, topk=(1,): [c / len(t) for c in _hits(o, t, topk)])
    full = zsc.evaluate(model, loader, tok, classes, TEMPLATES, "cpu", amp=False)
    assert ours == pytest.approx(full, nan_ok=True)


def test_metrics_count_exactly_on_hand_made_logits():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    targets = torch.tensor([0, 1, 1, 2])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(0.5)  # samples 0 and 1
    assert math.isnan(m["acc5"])  # 3 classes
    # recalls: class 0 1/1, class 1 1/2, class 2 0/1 -> mean 0.5
    assert m["mean_per_class_recall"] == pytest.approx(0.5)


def _hits(output, target, topk=(1,)):
    """The oracles' top-k hit counts (CLIP_benchmark's and open_clip_train's `accuracy`), with ``.item()`` where they
    call ``float()`` on a 1-element array, which NumPy 2 refuses."""
    top = output.topk(max(topk), 1, True, True)[1].t()
    hit = top.eq(target.view(1, -1).expand_as(top))
    return [hit[:k].reshape(-1).float().sum().item() for k in topk]


class _Captioned(Dataset):
    """Items with 1 to 3 captions each (CLIP_benchmark's retrieval datasets give a list of captions per image)."""

    def __init__(self, n: int):
        self.x = _images(n, seed=3)
        self.captions = [[f"caption {i} variant {j}" for j in range(1 + i % 3)] for i in range(n)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.captions[i]


def _collate(items):
    return torch.stack([x for x, _ in items]), [caps for _, caps in items]


def test_retrieval_equals_clip_benchmark_with_several_captions_per_item(clip):
    model, tok = clip
    loader = DataLoader(_Captioned(30), batch_size=8, collate_fn=_collate)
    ours = evaluate_retrieval(model, loader, tok, recall_k=(1, 5, 10))
    theirs = zsr.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert ours == pytest.approx(theirs, abs=1e-9)
    assert set(ours) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


def test_retrieval_on_one_to_one_pairs_equals_open_clip_train():
    from open_clip_train.train import get_clip_metrics

    g = torch.Generator().manual_seed(4)
    items = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(items + 0.9 * torch.randn(50, 16, generator=g), dim=-1)
    ours = retrieval_metrics(items, texts, torch.arange(50))
    theirs = get_clip_metrics(items, texts, logit_scale=torch.tensor(100.0))
    for k in (1, 5, 10):
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(theirs[f"text_to_image_R@{k}"])
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(theirs[f"image_to_text_R@{k}"])
    assert 0 < ours["image_retrieval_recall@1"] < ours["image_retrieval_recall@10"] < 1  # not a degenerate case


def test_mmblocks_batches_feed_the_harness(clip):
    """A loader of mmblocks `Batch` objects: inputs go to encode_image, targets are the cls field, captions the txt
    field; the results equal those of the same data as plain pairs."""
    model, tok = clip
    x, y = _images(12), torch.arange(12) % len(CLASSES)
    batches = [Batch(x[i : i + 4], y[i : i + 4], [f"k{j}" for j in range(i, i + 4)]) for i in range(0, 12, 4)]
    pairs = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    assert evaluate_classification(model, batches, tok, CLASSES, TEMPLATES) == evaluate_classification(
        model, pairs, tok, CLASSES, TEMPLATES
    )
    captions = [f"caption {i}" for i in range(12)]
    with_txt = [
        Batch(x[i : i + 4], None, [f"k{j}" for j in range(i, i + 4)], fields={"txt": captions[i : i + 4]})
        for i in range(0, 12, 4)
    ]
    plain = [(x[i : i + 4], captions[i : i + 4]) for i in range(0, 12, 4)]
    assert evaluate_retrieval(model, with_txt, tok, recall_k=(1, 5)) == evaluate_retrieval(
        model, plain, tok, recall_k=(1, 5)
    )


def test_templates_and_bad_input_are_clear_errors(clip):
    model, tok = clip
    assert fill_template("a {c}.", "cat") == "a cat." and fill_template("a {}.", "cat") == "a cat."
    assert fill_template(lambda c: c.upper(), "cat") == "CAT"
    with pytest.raises(ValueError, match="no '\\{c\\}' or '\\{\\}' slot"):
        zero_shot_classifier(model, tok, CLASSES, ["a photo"])
    with pytest.raises(ValueError, match="no prompts for \\['two'\\]"):
        zero_shot_classifier(model, tok, ["one", "two"], {"one": ["the digit one"]})
    with pytest.raises(ValueError, match="non-empty list"):
        zero_shot_classifier(model, tok, CLASSES, "a photo of a {c}")
    with pytest.raises(ValueError, match="at least one"):
        zero_shot_classifier(model, tok, [], TEMPLATES)
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="recall@5 needs"):
        retrieval_metrics(emb, emb, torch.arange(4), recall_k=(5,))
    with pytest.raises(ValueError, match="1 items have no caption"):
        retrieval_metrics(emb, emb[:3], torch.arange(3), recall_k=(1,))
    with pytest.raises(ValueError, match="item index in \\[0, 4\\)"):
        retrieval_metrics(emb, emb, torch.tensor([0, 1, 2, 7]), recall_k=(1,))
    with pytest.raises(TypeError, match="\\(inputs, targets\\) pairs"):
        classify(model, torch.zeros(32, 2), [torch.zeros(2, 3, 32, 32)])


# ------------------------------------------------------------------------------------------------ mmblocks zeroshot
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 1, "width": 64, "head_width": 32, "patch_size": 8, "image_size": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_local_dir(tmp_path_factory):
    """An open_clip ``local-dir:`` folder (config + safetensors weights), as a user's own checkpoint would be."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    torch.manual_seed(5)
    model = open_clip.CLIP(
        **{
            **TINY_CFG,
            "vision_cfg": open_clip.CLIPVisionCfg(**TINY_CFG["vision_cfg"]),
            "text_cfg": open_clip.CLIPTextCfg(**TINY_CFG["text_cfg"]),
        }
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def test_zeroshot_command_equals_open_clips_own_zero_shot_run(tiny_local_dir, digit_shards, tmp_path, monkeypatch):
    from open_clip_train import zero_shot as oc_zero_shot

    from mmblocks.cli import main
    from mmblocks.data import build_loader
    from mmblocks.zeroshot_report import load_open_clip

    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(["a photo of the digit {c}.", "a handwritten {c}."]))
    out = tmp_path / "report"
    argv = ["zeroshot", "--model", f"open_clip:local-dir:{tiny_local_dir}", "--data", str(digit_shards)]
    assert main([*argv, "--templates", str(templates), "--out", str(out), "--workers", "0"]) == 0
    report = json.loads((out / "zeroshot.json").read_text())
    assert report["weights"].endswith("open_clip_model.safetensors") and report["image_size"] == 32
    assert (out / "confusion.png").stat().st_size > 1000 and "| acc1 |" in (out / "zeroshot.md").read_text()

    # the oracle: open_clip's classifier and open_clip_train's zero_shot.run on the same images
    zs = load_open_clip(f"local-dir:{tiny_local_dir}")
    names = json.loads((digit_shards / "index.json").read_text())["class_names"]
    assert report["classnames"] == names
    classifier = open_clip.build_zero_shot_classifier(
        zs.model, zs.tokenizer, names, ["a photo of the digit {}.", "a handwritten {}."]
    )
    loader = build_loader(
        digit_shards,
        "test",
        batch_size=64,
        image_size=32,
        num_workers=0,
        shuffle=False,
        augment="none",
        channels=3,
        mean=zs.mean,
        std=zs.std,
    )
    pairs = [(b.inputs, b.label) for b in loader]

    monkeypatch.setattr(oc_zero_shot, "accuracy", _hits)  # its helper's float() of a 1-element array: NumPy 2
    args = type("Args", (), {"device": "cpu", "precision": "fp32", "batch_size": 64})()
    top1, top5 = oc_zero_shot.run(zs.model, classifier, pairs, args)
    assert report["metrics"]["acc1"] == pytest.approx(top1)
    assert report["metrics"]["acc5"] == pytest.approx(top5)
    assert report["samples"] == sum(len(y) for _, y in pairs)


def test_zeroshot_command_refuses_what_would_download(tmp_path, capsys):
    from mmblocks.cli import main

    assert main(["zeroshot", "--model", "open_clip:hf-hub:laion/CLIP-ViT-B-32", "--data", str(tmp_path)]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err
    assert main(["zeroshot", "--model", "open_clip:ViT-B-32", "--checkpoint", "openai", "--data", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["zeroshot", "--model", "clip:RN50", "--data", str(tmp_path)]) == 2
    assert "open_clip:NAME" in capsys.readouterr().err


def test_zeroshot_command_refuses_shards_of_another_modality(tiny_local_dir, tmp_path, capsys):
    from mmblocks.cli import main

    (tmp_path / "index.json").write_text(json.dumps({"modality": "points", "class_names": ["a", "b"]}))
    assert main(["zeroshot", "--model", f"open_clip:local-dir:{tiny_local_dir}", "--data", str(tmp_path)]) == 2
    assert "holds points samples" in capsys.readouterr().err


def test_the_zero_shot_api_is_one_module():
    from mmblocks.eval import zeroshot

    assert zeroshot.evaluate_classification is evaluate_classification
    assert zeroshot.evaluate_retrieval is evaluate_retrieval

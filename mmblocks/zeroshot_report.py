"""`mmblocks zeroshot`: zero-shot classification or retrieval of a shard split by a CLIP-like model, written as a
report (``zeroshot.json``, ``zeroshot.md`` and, for classification, ``confusion.png``).

Models: ``open_clip:NAME`` with ``NAME`` a built-in open_clip architecture (its weights from ``--checkpoint FILE``, or
random with a warning in the report) or ``local-dir:PATH`` (a folder with ``open_clip_config.json`` and its weights
file). Nothing is downloaded: ``hf-hub:`` names and pretrained tags are refused. The images are loaded with the
model's own input size, mean and std (``open_clip.get_model_preprocess_cfg``). ``mmblocks:RUN`` is a trained
``task: contrastive`` run folder (its ``config.yaml`` and best weights, or a checkpoint folder inside it), in any
modality: the samples are loaded as the run's ``data`` section says, from the ``--data`` shards.

Class names come from the shards' ``index.json`` unless a file is given (a JSON list or one name per line);
templates from a file (a JSON list of ``{c}`` strings, a JSON ``{class: [prompts]}`` dict, or one template per line),
else ``["a photo of a {c}."]``. Retrieval reads the captions from the ``txt`` field (one per item) or
``json["captions"]`` (several).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .eval import classification_metrics, classify, evaluate_retrieval, zero_shot_classifier

__all__ = [
    "DEFAULT_TEMPLATES",
    "ZeroShotModel",
    "load_mmblocks_run",
    "load_open_clip",
    "read_lines_or_json",
    "run_zeroshot",
]

DEFAULT_TEMPLATES = ["a photo of a {c}."]


@dataclass
class ZeroShotModel:
    """A CLIP-like model with what evaluating it needs: its tokenizer and its image preprocessing."""

    model: torch.nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    weights: str  # where the weights came from, or "random init"
    loader: Callable[[Path, str, tuple[str, ...]], Any] | None = None  # (shards, split, fields) -> loader
    templates: list[str] | None = None  # the default prompts (a contrastive run's training templates)


def load_open_clip(name: str, checkpoint: str | Path | None = None, device: str = "cpu") -> ZeroShotModel:
    """An open_clip model by architecture name (weights from `checkpoint`) or ``local-dir:PATH``, offline."""
    import open_clip

    if name.startswith("hf-hub:"):
        raise ConfigError(
            f"open_clip model {name!r} would be downloaded from the Hugging Face Hub; nothing is downloaded here: "
            "give a built-in architecture with --checkpoint FILE, or local-dir:PATH (open_clip_config.json + weights)"
        )
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"{name}: expected a folder with open_clip_config.json (and its weights file)")
        if checkpoint is not None:
            raise ConfigError("a local-dir: model carries its own weights; drop --checkpoint")
        weights = next((str(p) for p in sorted(folder.glob("open_clip_*.safetensors"))), None) or next(
            (str(p) for p in sorted(folder.glob("open_clip_*.bin"))), "random init"
        )
        model = open_clip.create_model(name, device=device)
    else:
        if name not in open_clip.list_models():
            known = ", ".join(open_clip.list_models()[:8])
            raise ConfigError(f"unknown open_clip architecture {name!r}; known: {known}, ... (open_clip.list_models())")
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ConfigError(
                f"--checkpoint {checkpoint}: no such file (a weights file; pretrained tags would download)"
            )
        model = open_clip.create_model(name, pretrained=str(checkpoint) if checkpoint else None, device=device)
        weights = str(checkpoint) if checkpoint else "random init"
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    size = size if isinstance(size, int) else int(size[0])
    return ZeroShotModel(
        model.eval(),
        open_clip.get_tokenizer(name),
        size,
        tuple(float(v) for v in cfg["mean"]),
        tuple(float(v) for v in cfg["std"]),
        name,
        weights,
    )


def load_mmblocks_run(run: str | Path, data: str | Path | None = None, device: str = "cpu") -> ZeroShotModel:
    """A trained ``task: contrastive`` run as a CLIP-like model (`mmblocks.models.ContrastiveModel`): its config,
    its best (else last) weights, and a loader of the run's modality for other shards."""
    from .builders import build_encoder
    from .data import build_loader
    from .models import ContrastiveModel
    from .recipes import loader_options, prepare, run_config
    from .train.checkpoint import load_trainable_weights, weights_file

    overrides = [f"data.root={data}", f"train.device={device}"] if data is not None else [f"train.device={device}"]
    cfg, _, task = prepare(run_config(run), overrides)
    if cfg["task"]["name"] != "contrastive":
        raise ConfigError(f"{run} trained task {cfg['task']['name']!r}; zero-shot needs a task: contrastive run")
    encoder = build_encoder(cfg, task=task, verbose=False)
    weights = weights_file(run)
    load_trainable_weights(encoder, weights)
    model = ContrastiveModel(encoder).to(device).eval()
    d = cfg["data"]

    def loader(shards: Path, split: str, fields: tuple[str, ...]) -> Any:
        options = {**loader_options(d), "batch_size": d["eval_batch_size"] or d["batch_size"]}
        return build_loader(shards, split, **{**options, "augment": False, "shuffle": False, "fields": fields})

    templates = list(cfg["task"].get("templates") or []) or None
    return ZeroShotModel(model, model.tokenizer, 0, (), (), f"mmblocks:{run}", str(weights), loader, templates)


def read_lines_or_json(path: str | Path) -> Any:
    """A JSON file as parsed, else one entry per non-empty line."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip()]


def _class_names(data: Path, classnames: str | Path | None) -> list[str]:
    if classnames is not None:
        names = read_lines_or_json(classnames)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"--classnames {classnames}: expected a JSON list of strings or one name per line")
        return names
    index = data / "index.json"
    if not index.is_file():
        raise ConfigError(f"{data} has no index.json to read class names from; give --classnames FILE")
    names = json.loads(index.read_text()).get("class_names")
    if not names:
        raise ConfigError(f"{index} lists no class_names; give --classnames FILE")
    return list(names)


def _templates(templates: str | Path | None) -> list[str] | dict[str, list[str]]:
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    value = read_lines_or_json(templates)
    if isinstance(value, dict | list) and value:
        return value
    raise ConfigError(f"--templates {templates}: expected a JSON list or dict of prompts, or one template per line")


def run_zeroshot(
    model: ZeroShotModel,
    data: str | Path,
    split: str = "test",
    task: str = "classification",
    classnames: str | Path | None = None,
    templates: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "cpu",
    recall_k: tuple[int, ...] = (1, 5, 10),
) -> dict[str, Any]:
    """Score `split` of the shards at `data` and write the report to `out` (default ``runs/zeroshot/<data>``);
    returns the report's data."""
    from .data import build_loader
    from .tasks.classification import plot_confusion

    if task not in ("classification", "retrieval"):
        raise ConfigError(f"unknown zero-shot task {task!r}: classification or retrieval")
    data = Path(data)
    index = data / "index.json"
    modality = json.loads(index.read_text()).get("modality", "image") if index.is_file() else "image"
    out = Path(out) if out is not None else Path("runs") / "zeroshot" / data.name
    fields = ("txt",) if task == "retrieval" else ("cls",)
    if model.loader is not None:
        loader = model.loader(data, split, fields)
    else:
        if modality != "image":
            raise ConfigError(f"{data} holds {modality} samples; an open_clip model encodes images")
        loader = build_loader(
            data,
            split,
            batch_size=batch_size,
            image_size=model.image_size,
            num_workers=num_workers,
            shuffle=False,
            augment="none",
            channels=3,
            mean=model.mean,
            std=model.std,
            fields=fields if task == "retrieval" else None,
        )
    report: dict[str, Any] = {
        "model": model.name,
        "weights": model.weights,
        "data": str(data),
        "split": split,
        "task": task,
        "modality": modality,
        "image_size": model.image_size,
    }
    out.mkdir(parents=True, exist_ok=True)
    if task == "classification":
        names = _class_names(data, classnames)
        prompts = _templates(templates) if templates is not None or not model.templates else list(model.templates)
        classifier = zero_shot_classifier(model.model, model.tokenizer, names, prompts, device, progress=True)
        logits, targets = classify(model.model, classifier, loader, device, progress=True)
        if int(targets.max()) >= len(names):
            raise ConfigError(f"the shards have labels up to {int(targets.max())} but only {len(names)} class names")
        metrics = classification_metrics(logits, targets)
        conf = torch.zeros(len(names), len(names), dtype=torch.long)
        conf.index_put_((targets, logits.argmax(1)), torch.ones_like(targets), accumulate=True)
        plot_confusion(conf, names, out / "confusion.png", title=f"zero-shot confusion ({split})")
        report.update(
            samples=len(targets),
            classnames=names,
            templates=prompts,
            metrics=metrics,
            chance={
                "acc1": 1 / len(names),
                "acc5": 5 / len(names) if len(names) >= 5 else math.nan,
                "mean_per_class_recall": 1 / len(names),
            },
            per_class_recall={
                n: (int(conf[i, i]) / int(conf[i].sum())) if conf[i].sum() else None for i, n in enumerate(names)
            },
        )
    else:
        metrics = evaluate_retrieval(model.model, loader, model.tokenizer, recall_k, device, progress=True)
        report.update(metrics=metrics)
    (out / "zeroshot.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "zeroshot.md").write_text(_markdown(report))
    report["out"] = str(out)
    return report


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Zero-shot {report['task']}: {report['model']} on {report['data']} ({report['split']})",
        "",
        f"Weights: {report['weights']}. "
        + (
            f"Images at {report['image_size']} px with the model's mean and std."
            if report["image_size"]
            else f"{report['modality'].capitalize()} samples loaded as the run's data section says."
        ),
    ]
    if report["weights"] == "random init":
        lines += ["", "**The model has random weights**: these figures measure nothing but chance."]
    lines += ["", "| metric | value | chance |", "|---|---|---|"]
    chance = report.get("chance", {})
    for key, value in report["metrics"].items():
        c = chance.get(key)
        c_txt = "—" if c is None or (isinstance(c, float) and math.isnan(c)) else f"{c:.4f}"
        lines.append(f"| {key} | {value:.4f} | {c_txt} |")
    if report["task"] == "classification":
        lines += ["", f"{report['samples']} samples, {len(report['classnames'])} classes.", ""]
        lines += ["| class | recall |", "|---|---|"]
        lines += [f"| {n} | {'—' if r is None else f'{r:.3f}'} |" for n, r in report["per_class_recall"].items()]
        lines += ["", "![confusion matrix](confusion.png)"]
    return "\n".join(lines) + "\n"

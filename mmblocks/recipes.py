"""Config-driven entry points: a config -> built objects (task, encoder, loaders) -> `mmblocks.train.Trainer`.

This is what ``mmblocks train | eval`` run, and the one module that joins the config system to the training library::

    from mmblocks.recipes import build_trainer, train
    summary = train("configs/image/digits_vit_tiny_smollm2.yaml", ["train.epochs=5"])
    trainer = build_trainer("configs/image/digits_vit_tiny.yaml", resume=True)   # to inspect before .fit()

The config is validated once (`load_config`), the process group joined, everything seeded by ``train.seed``, the
offline dataset made when ``data.dataset`` names one and its shards are missing, then the task, the encoder (with the
task's head) and the loaders (requiring the fields the task needs) are built and handed to the `Trainer`.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .builders import build_encoder, build_task, config_errors
from .config import Config, ConfigError, dump_config, load_config
from .data import build_loader, make_dataset
from .errors import MissingShardsError
from .models import BACKBONES, resolve_backbone
from .tasks import Task
from .train import Callback, DistInfo, Trainer, TrainSettings, evaluate, init_distributed, seed_everything
from .train.checkpoint import checkpoint_info, load_trainable_weights, weights_file
from .train.distributed import barrier
from .train.trainer import amp_dtype

__all__ = [
    "build_loaders",
    "build_trainer",
    "check_task_state",
    "default_eval_dir",
    "ensure_dataset",
    "evaluate_checkpoint",
    "generate_text",
    "loader_options",
    "make_loader",
    "prepare",
    "run_config",
    "run_info",
    "train",
]

ConfigLike = str | os.PathLike | Mapping[str, Any]

#: ``data`` keys that are not `build_loader` arguments (the rest are passed to it under their own names).
RECIPE_DATA_KEYS = ("dataset", "root", "train_split", "val_split", "test_split", "eval_batch_size", "augment_policy")


def ensure_dataset(data_cfg: Mapping[str, Any], dist_info: DistInfo) -> None:
    """Make the offline dataset into ``data.root`` when it is named and missing (rank 0 writes, others wait)."""
    root = Path(data_cfg["root"])
    if (root / "index.json").is_file():
        return
    shards = sorted(p.name for p in root.glob("*.tar")) if root.is_dir() else []
    if shards:  # never write a dataset over shards whose index is gone
        raise MissingShardsError(
            f"{root} holds {len(shards)} shard(s) ({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}) but "
            "no index.json, which gives the splits, the classes and the sample counts: restore it, or move the "
            f"shards away and remake the dataset (`mmblocks shards make ... --out {root}`)"
        )
    name = data_cfg["dataset"]
    if name is None:
        raise MissingShardsError(
            f"no shards at {root} (index.json missing): write some with `mmblocks shards write ...` or set "
            "data.dataset to an offline dataset (`mmblocks shards make --help` lists them)"
        )
    if dist_info.is_main:
        make_dataset(name, root)
    barrier()


def loader_options(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` keys that `build_loader` takes, under its own argument names."""
    params = inspect.signature(build_loader).parameters
    return {k: v for k, v in data_cfg.items() if k in params}


def make_loader(cfg: Config, split: str, *, train: bool, task: Task, dist_info: DistInfo) -> Any:
    """The loader of `split` for this rank: the ``data`` options, training or evaluation behaviour (augmentation,
    shuffling, resampling only when training), and the fields the task needs required in every sample."""
    d = cfg["data"]
    augment: Any = d["augment"] and train
    if augment and d["augment_policy"] is not None:
        augment = d["augment_policy"]
    with config_errors("data"):  # what the loader or its codec rejects (a video with augment on, ...)
        return build_loader(
            d["root"],
            split,
            **{
                **loader_options(d),
                "batch_size": d["batch_size"] if train else (d["eval_batch_size"] or d["batch_size"]),
                "augment": augment,
                "shuffle": train,
                "resampled": d["resampled"] and train,
                "seed": cfg["train"]["seed"],
                "rank": dist_info.rank,
                "world_size": dist_info.world_size,
                "drop_last": False,
                "fields": task.fields,
            },
        )


def build_loaders(cfg: Config, task: Task, dist_info: DistInfo) -> dict[str, Any]:
    """``{"train": ..., "val": ..., "test": ...}`` loaders of this rank (val / test only when their split is set)."""
    d = cfg["data"]
    return {
        role: make_loader(cfg, d[f"{role}_split"], train=role == "train", task=task, dist_info=dist_info)
        for role in ("train", "val", "test")
        if d[f"{role}_split"] is not None
    }


def run_info(cfg: Config) -> dict[str, Any]:
    """What a run's summary says about its components."""
    m = cfg["model"]
    llm = m["llm"]
    own = BACKBONES.info(resolve_backbone(m["backbone"]["name"])[0])["tokenizer"]
    return {
        "name": cfg["name"],
        "tokenizer": m["tokenizer"]["name"] or own,
        "backbone": m["backbone"]["name"],
        "llm": f"{llm['source']} layers {llm['layers']} tune={llm['tune']}" if llm["enabled"] else "none",
    }


def run_config(run: str | os.PathLike) -> Path:
    """The ``config.yaml`` of a run folder, found from the folder or from a checkpoint folder inside it."""
    path = Path(run)
    for candidate in (
        path / "config.yaml",
        path.parent.parent / "config.yaml",
        path.parent.parent.parent / "config.yaml",
    ):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{run}: not a run folder (no config.yaml in it or above its checkpoint)")


def prepare(config: ConfigLike, overrides: Sequence[str] = ()) -> tuple[Config, DistInfo, Task]:
    """Validate the config, join the process group, seed, make the dataset if needed and build the task:
    ``(cfg, dist, task)``. Random-init LLM blocks get ``train.seed`` unless ``model.llm.seed`` is set (a resumed
    run rebuilds them identically)."""
    cfg = copy.deepcopy(load_config(config, overrides))  # the LLM seed below must not reach the caller's config
    t = cfg["train"]
    dist = init_distributed(t["device"])
    seed_everything(t["seed"])
    ensure_dataset(cfg["data"], dist)
    if cfg["model"]["llm"]["seed"] is None:
        cfg["model"]["llm"]["seed"] = t["seed"]
    task = build_task(cfg)
    if task is None:
        raise ConfigError(
            f"task {cfg['task']['name']!r} needs the number of classes: set model.num_classes or write shards whose "
            "index.json lists class names"
        )
    return cfg, dist, task


def build_trainer(
    config: ConfigLike,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback | Any] = (),
) -> Trainer:
    """A `Trainer` for `config` (a YAML path or a dict) with ``key=value`` `overrides` (`prepare`, then the encoder
    with the task's head, the loaders and the ``train`` settings). ``resume``: continue from the latest checkpoint
    in ``train.out_dir``; ``overwrite``: move a previous run in ``train.out_dir`` aside (without either, a folder
    that holds a run is refused); ``callbacks``: as `Trainer`."""
    cfg, dist, task = prepare(config, overrides)
    model = build_encoder(cfg, task=task, verbose=dist.is_main)
    loaders = build_loaders(cfg, task, dist)
    return Trainer(
        model,
        task,
        loaders["train"],
        val_loader=loaders.get("val"),
        test_loader=loaders.get("test"),
        settings=TrainSettings(**cfg["train"]),
        callbacks=callbacks,
        resume=resume,
        overwrite=overwrite,
        dist=dist,
        run_info=run_info(cfg),
        files={"config.yaml": dump_config(cfg)},
    )


def train(
    config: ConfigLike, overrides: Sequence[str] = (), resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """``mmblocks train CONFIG [overrides] [--resume | --overwrite]`` as a function: returns the run's summary."""
    return build_trainer(config, overrides, resume=resume, overwrite=overwrite).fit()


def check_task_state(task: Task, checkpoint: str | os.PathLike) -> None:
    """Refuse a checkpoint whose task state (a prefix-LM's prompt format) the config's task does not reproduce; a bare
    ``model.safetensors`` carries none and passes."""
    path = weights_file(checkpoint)
    if path.parent.joinpath("state.json").is_file():
        with config_errors("task"):
            task.check_checkpoint_state(checkpoint_info(path.parent)["extra"].get("task") or {})


def default_eval_dir(checkpoint: str | os.PathLike) -> Path | None:
    """``<run>/eval/<step-*>`` for a checkpoint inside a run folder (``<run>/checkpoints/step-*``); else None."""
    path = weights_file(checkpoint)
    if path.parent.parent.name == "checkpoints":
        return path.parent.parent.parent / "eval" / path.parent.name
    return None


def evaluate_checkpoint(
    config: ConfigLike,
    checkpoint: str | os.PathLike,
    overrides: Sequence[str] = (),
    splits: Sequence[str] = (),
    out_dir: str | os.PathLike | None = None,
) -> dict[str, dict[str, float]]:
    """``mmblocks eval CONFIG --checkpoint CKPT``: the encoder of `config` with the trained weights of `checkpoint`
    (a ``step-*`` folder, a checkpoints or run folder (its latest) or a ``model.safetensors``), evaluated on `splits`
    (default: the config's val and test splits); ``{split: metrics}``. Only the weights are read. With `out_dir`,
    ``metrics.json``, the task's files (``predictions_{split}.jsonl``) and ``eval.md`` (its report sections, e.g.
    sample predictions next to their references) are written there."""
    cfg, dist, task = prepare(config, overrides)
    model = build_encoder(cfg, task=task, verbose=False).to(dist.device)
    load_trainable_weights(model, checkpoint)
    check_task_state(task, checkpoint)
    d = cfg["data"]
    names = tuple(splits) or tuple(s for s in (d["val_split"], d["test_split"]) if s)
    results, sections = {}, []
    for split in names:
        loader = make_loader(cfg, split, train=False, task=task, dist_info=dist)
        try:
            results[split], metrics = evaluate(
                model, task, loader, device=dist.device, autocast_dtype=amp_dtype(cfg["train"]["amp"], dist.device)
            )
        finally:
            loader.close()
        if out_dir is not None and dist.is_main:
            sections += metrics.report(Path(out_dir), split)
    if out_dir is not None and dist.is_main:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
        text = [f"# Evaluation of {weights_file(checkpoint)}\n"] + [f"## {t}\n\n{body}" for t, body in sections]
        (out / "eval.md").write_text("\n".join(text))
    return results


def _input_codec(cfg: Config, path: Path) -> Any:
    """The evaluation codec of the config's modality (default: the one whose shard keys hold `path`'s suffix)."""
    from .data import MODALITY_KEYS, create_codec
    from .data.schema import IMAGE_KEYS

    ext = path.suffix.lower().lstrip(".")
    d = cfg["data"]
    modality = d["modality"]
    if modality is None:
        by_ext = {"image": IMAGE_KEYS, **MODALITY_KEYS}
        modality = next((m for m, keys in by_ext.items() if ext in keys), None)
        if modality is None:
            known = sorted({k for keys in by_ext.values() for k in keys})
            raise ConfigError(f"{path}: cannot tell the modality of a .{ext} file (known: {known}); set data.modality")
    with config_errors("data"):
        options = {k: v for k, v in loader_options(d).items() if k != "modality"}
        return create_codec(modality, **{**options, "train": False, "augment": False}), ext


def generate_text(
    config: ConfigLike,
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    prompt: str | None = None,
    overrides: Sequence[str] = (),
    max_new_tokens: int | None = None,
) -> list[str]:
    """``mmblocks generate CONFIG --checkpoint CKPT --input FILE``: the text a trained prefix-LM model writes for each
    input file (an image, an audio clip, a video), decoded as the evaluation loader decodes that modality.

    The prompt is the one the model was trained with (the checkpoint's, which must match the config's); `prompt`
    replaces it: for a ``qa`` task it is the question, otherwise the whole instruction (the placeholder is put in
    front when it lacks one).
    """
    cfg = copy.deepcopy(load_config(config, overrides))
    seed_everything(cfg["train"]["seed"])
    task = build_task(cfg)
    if task is None or not hasattr(task, "generate"):
        raise ConfigError(f"task {cfg['task']['name']!r} does not generate text; generate needs a prefix_lm task")
    model = build_encoder(cfg, task=task, verbose=False).eval()
    load_trainable_weights(model, checkpoint)
    check_task_state(task, checkpoint)
    if max_new_tokens is not None:
        task.max_new_tokens = int(max_new_tokens)
    text = task.prompt
    if prompt is not None:
        placeholder = task.format.placeholder
        if task.target == "qa":
            text = task.prompt.format(question=prompt)
        else:
            text = prompt if placeholder is None or placeholder in prompt else f"{placeholder}\n{prompt}"
    elif task.target == "qa":
        raise ConfigError("this model answers questions: give one with --prompt")
    out = []
    for item in inputs:
        file = Path(item)
        if not file.is_file():
            raise ConfigError(f"--input: file not found: {file}")
        codec, ext = _input_codec(cfg, file)
        raw = codec.collate([codec.decode(file.read_bytes(), ext, file.stem)])
        x, mask, extra = codec.finish(raw)
        with torch.no_grad():
            tokens = model.forward_features(x, mask, **extra)
            out.append(task.generate(model, tokens, [text])[0])
    return out

"""Builders: a validated config -> the task and the `MMEncoder`; the design's named encoders as plain functions.

Every part comes from a registry by the name the config gives (`mmblocks.models.create_backbone`,
`tokenizers_mm.create_tokenizer`, `adapters.create_adapter`, `mmblocks.heads.create_head`,
`mmblocks.tasks.create_task`) with the options beside that name; what goes wrong in a part becomes a `ConfigError`
naming the config key that built it. Named encoders (`vit_small_llm_last`, `point_bert_llm`, `ast_llm`,
`videomae_llm`) are plain functions over the same path, torchtune style.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from adapters import create_adapter
from tokenizers_mm import create_tokenizer
from tokenizers_mm.registry import RegistryError

from .analysis import text_rms
from .config import ConfigError, load_config
from .errors import MMBlocksError
from .heads import HEADS
from .llm import load_blocks
from .models import BACKBONES, LLMStage, MMEncoder, create_backbone, create_text_tower, resolve_backbone
from .tasks import TASKS, Task, create_task
from .train.checkpoint import load_trainable_weights

__all__ = [
    "ENCODER_STAGES",
    "ast_llm",
    "build_encoder",
    "build_text_tower",
    "build_llm_stage",
    "build_task",
    "build_tokenizer_and_backbone",
    "freeze_stages",
    "load_encoder_weights",
    "point_bert_llm",
    "videomae_llm",
    "vit_small_llm_last",
    "vit_tiny_llm_last",
]

#: Encoder stages a config may initialise from a checkpoint or freeze (attribute names of `MMEncoder`).
ENCODER_STAGES = ("tokenizer", "backbone", "llm_stage", "head")


@contextmanager
def config_errors(where: str) -> Iterator[None]:
    """Turn what a component's constructor rejects (a `ValueError`, an unknown registry name or option) into a
    `ConfigError` that names the config key `where` built it from."""
    try:
        yield
    except MMBlocksError:  # already says what is wrong (missing shards, an unknown model family, ...)
        raise
    except (ValueError, IndexError, RegistryError) as err:  # IndexError: a layer index out of range
        raise ConfigError(f"{where}: {err}") from err


def _data_index(data_cfg: Mapping[str, Any]):
    from .data import read_index

    return read_index(data_cfg["root"])


def build_task(cfg: Mapping[str, Any] | str | os.PathLike, num_classes: int | None = None) -> Task | None:
    """The config's ``task``. A task that needs the class count gets ``num_classes``, else ``model.num_classes``,
    else the shards' (and their class names); None when that count is unknown yet (no shards, none given)."""
    cfg = load_config(cfg)
    options = dict(cfg["task"])
    name = options.pop("name")
    params = TASKS.parameters(name)
    if "num_classes" in params:
        classes = num_classes or cfg["model"]["num_classes"]
        if classes is None:  # only then the shards are read: they may not exist yet when the count is given
            index = _data_index(cfg["data"])
            names = index.class_names if index is not None else None
            if not names:
                return None
            classes = len(names)
            if "class_names" in params:
                options["class_names"] = list(names)
        options["num_classes"] = classes
    elif "class_names" in params and not options.get("class_names"):  # optional there (a contrastive task's)
        index = _data_index(cfg["data"])
        if index is not None and index.class_names:
            options["class_names"] = list(index.class_names)
    with config_errors("task"):
        return create_task(name, **options)


def build_tokenizer_and_backbone(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """The tokenizer and backbone a validated ``model`` config names.

    With no ``model.tokenizer.name`` (or the backbone's own one), the backbone embeds its input itself: a ViT its
    patches, AST its spectrogram patches, Point-BERT its point groups (``model.tokenizer.kwargs`` configure that
    tokenizer where it has options). Another tokenizer feeds the backbone's blocks when the backbone allows it (a
    ViT's blocks serve ``audio_patches`` (AST), ``video_tubelets`` (VideoMAE), ``motion``, ``audio_frames``), built
    with the backbone's width and ``model.tokenizer.kwargs``.
    """
    options = dict(model_cfg["backbone"])
    name = options.pop("name")
    entry, _ = resolve_backbone(name)
    info = BACKBONES.info(entry)
    tok_name, tok_kwargs = model_cfg["tokenizer"]["name"], dict(model_cfg["tokenizer"]["kwargs"])
    own = info["tokenizer"]
    use_own = tok_name is None or tok_name == own
    if not use_own and not info["any_tokenizer"]:
        raise ConfigError(
            f"model.tokenizer.name: backbone {entry} needs {own!r} (its own tokenizer: leave the name null), "
            f"got {tok_name!r}"
        )
    params = BACKBONES.parameters(entry)
    context: dict[str, Any] = {"in_chans": data_cfg["channels"]} if "in_chans" in params else {}
    if info["flag"] is not None:
        context[info["flag"]] = use_own
    with config_errors("model.backbone"):
        backbone = create_backbone(name, **options, **context)
    with config_errors(f"model.tokenizer.kwargs for {own if use_own else tok_name!r}"):
        if use_own:
            tokenizer = backbone.make_tokenizer(**tok_kwargs)
        else:
            tokenizer = create_tokenizer(tok_name, **{**backbone.tokenizer_kwargs(), **tok_kwargs})
    return tokenizer, backbone


def build_llm_stage(llm_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], width: int) -> LLMStage:
    """``adapter_in -> load_blocks(**model.llm) -> adapter_out`` for an encoder of width `width`."""
    options = {k: v for k, v in llm_cfg.items() if k not in ("enabled", "tune_kwargs")}
    with config_errors("model.llm"):
        blocks = load_blocks(**options, **llm_cfg["tune_kwargs"])
    stage = []
    for key, (d_in, d_out) in (
        ("adapter_in", (width, blocks.hidden_size)),
        ("adapter_out", (blocks.hidden_size, width)),
    ):
        with config_errors(f"model.{key}"):
            stage.append(create_adapter(model_cfg[key]["name"], d_in, d_out, **model_cfg[key]["kwargs"]))
    init_rms = model_cfg["adapter_in"].get("init_rms")
    if init_rms is not None:
        init = model_cfg.get("init") or {}
        if init.get("checkpoint") is not None and "llm_stage" in (init.get("stages") or ()):
            raise ConfigError(
                "model.adapter_in.init_rms rescales adapter_in on the first batch, but model.init loads a trained "
                "llm_stage from a checkpoint: drop init_rms, or llm_stage from model.init.stages"
            )
        if "llm_stage" in (model_cfg.get("freeze") or ()):
            raise ConfigError("model.adapter_in.init_rms needs a trained adapter_in, but model.freeze holds llm_stage")
    if isinstance(init_rms, str):
        if init_rms != "text":
            raise ConfigError(f"model.adapter_in.init_rms: expected a number, 'text' or null, got {init_rms!r}")
        with config_errors("model.adapter_in.init_rms"):
            init_rms = text_rms(llm_cfg["source"], blocks.layer_indices[0])
        blocks.text_rms = init_rms  # stored with the block
    return LLMStage(
        stage[0],
        blocks,
        stage[1],
        adapter_in_rms=None if init_rms is None else float(init_rms),
        residual=bool(model_cfg.get("stage_residual", False)),
    )


def build_text_tower(tower_cfg: Mapping[str, Any]) -> nn.Module:
    """The text tower a validated ``model.text_tower`` section names (`mmblocks.models.text_towers`), built from a
    generator of its own so that the encoder's initialisation does not depend on it."""
    options = dict(tower_cfg)
    name = options.pop("name")
    with torch.random.fork_rng(devices=[]), config_errors("model.text_tower"):
        torch.manual_seed(torch.initial_seed() + 2)
        return create_text_tower(name, **options)


def _check_stages(stages: Sequence[str]) -> tuple[str, ...]:
    bad = [s for s in stages if s not in ENCODER_STAGES]
    if bad:
        raise ConfigError(f"unknown encoder stage(s) {bad}; stages are {list(ENCODER_STAGES)}")
    return tuple(stages)


def load_encoder_weights(
    encoder: MMEncoder, checkpoint: str | os.PathLike, stages: Sequence[str] = ENCODER_STAGES
) -> list[str]:
    """Copy the weights of `stages` from an mmblocks checkpoint (a ``step-*`` folder, a ``checkpoints`` folder (its
    latest) or a ``model.safetensors`` file) into `encoder` (`mmblocks.train.load_trainable_weights`); returns the
    names loaded. Only tensors of the named stages are read (e.g. a trained tokenizer + backbone under a new head or
    a new LLM stage). A shape mismatch, or a stage with nothing to load, is an error."""
    return load_trainable_weights(encoder, checkpoint, _check_stages(stages))


def freeze_stages(encoder: MMEncoder, stages: Sequence[str]) -> None:
    """Turn off gradients of the named stages (a frozen pretrained tower under a trained adapter, ...); frozen
    stages also run in eval mode (no dropout, drop-path or BatchNorm updates) whatever the encoder's mode."""
    prefixes = tuple(f"{s}." for s in _check_stages(stages))
    for name, param in encoder.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    encoder.frozen_stages = tuple(stages)
    encoder.train(encoder.training)


def build_encoder(
    cfg: Mapping[str, Any] | str | os.PathLike,
    num_classes: int | None = None,
    verbose: bool = True,
    task: Task | None = None,
) -> MMEncoder:
    """An `MMEncoder` from a config (a dict or a YAML path; validated here).

    ``task``: the task whose head the encoder ends in (default: the config's, `build_task`; without a known class
    count the encoder has no head and returns its final `Tokens`). ``num_classes`` overrides ``model.num_classes``.
    ``verbose``: print the table of trainable / frozen parameters per stage.
    """
    cfg = load_config(cfg)
    m = cfg["model"]
    tokenizer, backbone = build_tokenizer_and_backbone(m, cfg["data"])
    llm_stage = None
    if m["llm"]["enabled"]:
        # from a stream of its own, so the head after it starts as in the baseline of the same seed: arms of one
        # seed differ only in the LLM stage (paired comparisons, `mmblocks study`)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed() + 1)
            llm_stage = build_llm_stage(m["llm"], m, backbone.embed_dim)
    task = task if task is not None else build_task(cfg, num_classes)
    head = None
    if task is not None:
        options = dict(m["head"])
        name = options.pop("name")
        if "pool" in options and options["pool"] is None:  # the backbone's summary token (cls, or last)
            options["pool"] = backbone.readout
        if m["text_tower"] is not None:
            head_name = name or task.default_head
            if "text_tower" not in HEADS.parameters(head_name):
                raise ConfigError(
                    f"model.text_tower is set but head {head_name!r} takes no text tower (task: contrastive trains "
                    "one): drop model.text_tower"
                )
            options["text_tower"] = build_text_tower(m["text_tower"])
        if getattr(task, "head_needs_tokenizer", False):  # a detokenizer head inverts the encoder's tokenizer
            options["tokenizer"] = tokenizer
        with config_errors("model.head"):
            head = task.build_head(backbone.embed_dim, name, **options)
    with config_errors("model.insert_at"):
        encoder = MMEncoder(tokenizer, backbone, llm_stage, head, insert_at=m["insert_at"])
    init = m["init"]
    loaded: list[str] = []
    if init["checkpoint"] is not None:
        loaded = load_encoder_weights(encoder, init["checkpoint"], stages=init["stages"])
    if hasattr(head, "codec_state_names"):  # a head over a trained VQ tokenizer (code_lm) must get all of it
        have = set(loaded)
        missing = [n for n in (f"head.{k}" for k in head.codec_state_names()) if n not in have]
        if missing:
            raise ConfigError(
                f"model.init.checkpoint: head {type(head).__name__} generates the codes of a trained VQ tokenizer, "
                f"but {len(missing)} of its tensors were not loaded (e.g. {missing[:2]}): give the run of its "
                "tokenizer (e.g. configs/pretrain/digits_vq_pixels.yaml) with model.init.stages holding head"
            )
    freeze_stages(encoder, m["freeze"])
    if verbose:
        print(encoder.parameter_table())
    return encoder


# ------------------------------------------------------------------------------------------------ named encoders
def _named(num_classes: int, model: dict[str, Any], llm: bool, source: str, tune: str, layers, overrides) -> MMEncoder:
    model = {
        **model,
        "llm": {"enabled": llm, "source": source, "tune": tune, "layers": list(layers)},
        "num_classes": num_classes,
    }
    for key, value in overrides.items():
        model[key] = value
    return build_encoder({"model": model})


def vit_tiny_llm_last(
    num_classes: int,
    img_size: int = 224,
    patch_size: int = 16,
    llm: bool = True,
    source: str = "smollm2-135m",
    tune: str = "frozen",
    **model: Any,
) -> MMEncoder:
    """ViT-Tiny with the last block of `source` after its last block (the center paper's wiring)."""
    backbone = {"name": "vit_tiny_patch16_224", "img_size": img_size, "patch_size": patch_size}
    return _named(num_classes, {"backbone": backbone}, llm, source, tune, [-1], model)


def vit_small_llm_last(
    num_classes: int,
    img_size: int = 224,
    patch_size: int = 16,
    llm: bool = True,
    source: str = "smollm2-135m",
    tune: str = "frozen",
    **model: Any,
) -> MMEncoder:
    """ViT-Small with the last block of `source` after its last block (the center paper's ImageNet setting)."""
    backbone = {"name": "vit_small_patch16_224", "img_size": img_size, "patch_size": patch_size}
    return _named(num_classes, {"backbone": backbone}, llm, source, tune, [-1], model)


def point_bert_llm(
    num_classes: int,
    num_groups: int = 64,
    group_size: int = 32,
    llm: bool = True,
    source: str = "smollm2-135m",
    tune: str = "frozen",
    layers: Sequence[int] = (-1,),
    **model: Any,
) -> MMEncoder:
    """Point-BERT's encoder (64 FPS groups of 32 neighbours, mini-PointNet tokens, a 384-wide 12-block transformer
    re-adding the centre positions before every block, cls + max pooling) with LLM `layers` of `source` after its
    last block (the center paper's point-cloud setting). Input: clouds ``[B, P, 3]``."""
    parts = {
        "tokenizer": {"name": "points", "kwargs": {"num_groups": num_groups, "group_size": group_size}},
        "backbone": {"name": "point_transformer"},
        "head": {"pool": "cls+max"},
    }
    return _named(num_classes, parts, llm, source, tune, layers, model)


def ast_llm(
    num_classes: int,
    preset: str = "ast_base",
    target_frames: int = 1024,
    llm: bool = True,
    source: str = "smollm2-135m",
    tune: str = "frozen",
    layers: Sequence[int] = (-1,),
    **model: Any,
) -> MMEncoder:
    """AST (`preset`: ``ast_tiny`` / ``ast_small`` / ``ast_base``; 128-bin fbank patches over `target_frames`
    frames, cls + distillation tokens) with LLM `layers` of `source` after its last block. Input: 16 kHz waveforms
    ``[B, S]`` (or fbanks ``[B, T, 128]``)."""
    parts = {"backbone": {"name": preset}, "tokenizer": {"kwargs": {"target_frames": target_frames}}}
    return _named(num_classes, parts, llm, source, tune, layers, model)


def videomae_llm(
    num_classes: int,
    preset: str = "videomae_base",
    img_size: int = 224,
    num_frames: int = 16,
    llm: bool = True,
    source: str = "smollm2-135m",
    tune: str = "frozen",
    layers: Sequence[int] = (-1,),
    **model: Any,
) -> MMEncoder:
    """A VideoMAE encoder (`preset`: ``videomae_small`` ... ``videomae_huge``; 2 x 16 x 16 tubelets over
    `num_frames` frames of `img_size`, mean pooling) with LLM `layers` of `source` after its last block. Input:
    normalised frames ``[B, T, 3, H, W]``."""
    parts = {
        "backbone": {"name": preset},
        "tokenizer": {"kwargs": {"img_size": img_size, "num_frames": num_frames}},
        "head": {"pool": "mean"},
    }
    return _named(num_classes, parts, llm, source, tune, layers, model)

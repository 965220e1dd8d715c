"""YAML experiment configs: load, apply ``key=value`` overrides, validate against a schema, fill defaults.

Components are named by registry names only (timm model names, `adapters.list_adapters()`, LLM sources, tuning
modes), never by import paths. Every validation error names the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "load_config", "validate_config", "apply_overrides", "SCHEMA", "dump_config"]


class ConfigError(ValueError):
    """A config value or key that is not allowed; the message names the key path."""


@dataclass(frozen=True)
class Field:
    """One config key: default, accepted types, optional choices (a tuple or a callable returning one)."""

    default: Any
    types: tuple[type, ...] = ()
    choices: tuple[Any, ...] | Callable[[], Sequence[Any]] | None = None
    nullable: bool = False
    doc: str = ""
    open_mapping: bool = False  # a dict whose keys are passed through (e.g. tune_kwargs)


Schema = dict[str, "Field | Schema"]


def _adapters() -> list[str]:
    from adapters import list_adapters

    return list_adapters()


def _tokenizers() -> list[str]:
    from tokenizers_mm import list_tokenizers

    return list_tokenizers()


def _tunes() -> tuple[str, ...]:
    from .llm import TUNE_MODES

    return TUNE_MODES


INT, FLOAT, BOOL, STR = (int,), (int, float), (bool,), (str,)

SCHEMA: Schema = {
    "name": Field(None, STR, nullable=True, doc="run name (default: the config file name)"),
    "model": {
        "tokenizer": {
            "name": Field(
                None,
                STR,
                nullable=True,
                choices=_tokenizers,
                doc="a registered tokenizer; null: the ViT backbone's own image patches",
            ),
            "kwargs": Field({}, (dict,), open_mapping=True, doc="tokenizer arguments (embed_dim = backbone width)"),
        },
        "backbone": {
            "type": Field(
                "vit",
                STR,
                choices=("vit", "point_transformer", "causal_vit"),
                doc="vit: timm ViT blocks (images, AST audio, VideoMAE video); point_transformer: Point-BERT; "
                "causal_vit: iLLaMA (RMSNorm, SwiGLU, RoPE, cls last)",
            ),
            "size": Field("tiny", STR, choices=("tiny", "small", "base", "large"), doc="causal_vit preset"),
            "attention": Field(
                "causal", STR, choices=("causal", "bidirectional", "soft"), doc="causal_vit attention mode"
            ),
            "causal_impl": Field("pre_softmax", STR, choices=("pre_softmax", "post_softmax_mult")),
            "soft_mask": Field(
                None, (dict, float), nullable=True, open_mapping=True, doc="mode/cutoff/unit/r_start/r_end"
            ),
            "cls_position": Field("last", STR, choices=("last", "first"), doc="causal_vit class token place"),
            "rope": Field("1d", STR, choices=("1d", "2d", "none"), doc="causal_vit rotary"),
            "rope_theta": Field(10000.0, FLOAT),
            "rope_train_grid": Field(None, (list, str), nullable=True, doc="AS2DRoPE training grid, or 'auto'"),
            "name": Field("vit_tiny_patch16_224", STR, doc="a timm ViT name (type vit)"),
            "img_size": Field(None, INT, nullable=True),
            "patch_size": Field(None, INT, nullable=True),
            "embed_dim": Field(None, INT, nullable=True),
            "depth": Field(None, INT, nullable=True),
            "num_heads": Field(None, INT, nullable=True),
            "mlp_ratio": Field(None, FLOAT, nullable=True),
            "drop_path_rate": Field(0.0, FLOAT),
            "reg_tokens": Field(0, INT),
            "class_token": Field(True, BOOL),
            "no_embed_class": Field(False, BOOL),
            "checkpoint_path": Field(None, STR, nullable=True, doc="local backbone weights"),
        },
        "llm": {
            "enabled": Field(False, BOOL, doc="insert LLM blocks (adapter_in -> blocks -> adapter_out)"),
            "source": Field("smollm2-135m", STR),
            "layers": Field([-1], (list, int)),
            "attention": Field("bidirectional", STR, choices=("bidirectional", "causal", "soft")),
            "causal_impl": Field("pre_softmax", STR, choices=("pre_softmax", "post_softmax_mult")),
            "soft_mask": Field(
                None, (dict, float), nullable=True, open_mapping=True, doc="schedule of attention: soft"
            ),
            "rope": Field("none", STR, choices=("none", "native", "2d", "3d")),
            "rope_theta": Field(10000.0, FLOAT),
            "rope_train_grid": Field(None, (list,), nullable=True, doc="AS2DRoPE: the training grid"),
            "final_norm": Field("rms_unit", STR, choices=("none", "rms_unit", "llm")),
            "tune": Field("frozen", STR, choices=_tunes),
            "tune_kwargs": Field({}, (dict,), open_mapping=True),
            "dtype": Field(None, STR, nullable=True, choices=("float32", "bfloat16", "float16")),
            "attn_implementation": Field(None, STR, nullable=True),
            "config_overrides": Field({}, (dict,), open_mapping=True, doc="for random:<family> sources"),
            "seed": Field(None, INT, nullable=True),
        },
        "adapter_in": {
            "name": Field("linear", STR, choices=_adapters),
            "kwargs": Field({"bias": False}, (dict,), open_mapping=True),
        },
        "adapter_out": {
            "name": Field("linear", STR, choices=_adapters),
            "kwargs": Field({"bias": False}, (dict,), open_mapping=True),
        },
        "insert_at": Field(None, INT, nullable=True, doc="backbone blocks before the LLM stage (default: all)"),
        "head": {
            "pool": Field(
                None,
                STR,
                nullable=True,
                choices=("cls", "mean", "last", "cls+max"),
                doc="null: the backbone's readout (cls; last for a cls-last causal ViT)",
            ),
            "dropout": Field(0.0, FLOAT),
        },
        "num_classes": Field(None, INT, nullable=True, doc="default: from the shards' index.json"),
        "init": {
            "checkpoint": Field(None, STR, nullable=True, doc="an mmblocks checkpoint to initialise stages from"),
            "stages": Field(["tokenizer", "backbone"], (list,), doc="stages read from init.checkpoint"),
        },
        "freeze": Field([], (list,), doc="stages without gradients: tokenizer, backbone, llm_stage, head"),
    },
    "data": {
        "dataset": Field(
            None,
            STR,
            nullable=True,
            choices=("digits", "textures", "meshes", "keywords", "moving-digits"),
            doc="an offline dataset made into `root` when missing",
        ),
        "modality": Field(
            None, STR, nullable=True, choices=("image", "points", "audio", "video"), doc="default: the index's"
        ),
        "root": Field("runs/data", STR, doc="folder with index.json and the shards"),
        "train_split": Field("train", STR),
        "val_split": Field("val", STR, nullable=True),
        "test_split": Field("test", STR, nullable=True),
        "image_size": Field(32, INT, nullable=True, doc="images: crop/resize side; video: resize frames (null: keep)"),
        "channels": Field(3, INT, choices=(1, 3)),
        "batch_size": Field(64, INT),
        "eval_batch_size": Field(None, INT, nullable=True),
        "num_workers": Field(2, INT),
        "augment": Field(True, BOOL),
        "augment_policy": Field(
            None,
            STR,
            nullable=True,
            choices=("light", "crop", "scale_translate", "rotate"),
            doc="augmentation preset when augment is true: images light|crop, points scale_translate|rotate",
        ),
        "num_points": Field(None, INT, nullable=True, doc="points kept per cloud (null: all)"),
        "sample_rate": Field(16000, INT, doc="audio rate the model expects (files are resampled)"),
        "max_seconds": Field(None, FLOAT, nullable=True, doc="crop longer audio clips"),
        "num_frames": Field(16, INT, doc="video frames per clip"),
        "frame_sampling": Field("uniform", STR, choices=("uniform", "stride")),
        "frame_stride": Field(1, INT),
        "motion_vectors": Field(False, BOOL, doc="decode the codec motion vectors (batch.extra['motion'])"),
        "resampled": Field(False, BOOL, doc="infinite resampled shards (step-based training)"),
    },
    "train": {
        "out_dir": Field(None, STR, nullable=True, doc="default: runs/<name>"),
        "epochs": Field(10, INT),
        "max_steps": Field(None, INT, nullable=True, doc="stop after this many optimizer steps"),
        "steps_per_epoch": Field(None, INT, nullable=True, doc="with data.resampled"),
        "lr": Field(1e-3, FLOAT),
        "min_lr_ratio": Field(0.01, FLOAT),
        "weight_decay": Field(0.05, FLOAT),
        "betas": Field([0.9, 0.999], (list,)),
        "warmup_steps": Field(None, INT, nullable=True),
        "warmup_epochs": Field(1.0, FLOAT),
        "schedule": Field("cosine", STR, choices=("cosine", "linear", "constant")),
        "grad_clip": Field(1.0, FLOAT, nullable=True),
        "accum_steps": Field(1, INT),
        "label_smoothing": Field(0.0, FLOAT),
        "seed": Field(0, INT),
        "device": Field("auto", STR, choices=("auto", "cpu", "cuda")),
        "amp": Field("auto", STR, choices=("auto", "bf16", "fp16", "none")),
        "compile": Field(False, BOOL),
        "grad_checkpointing": Field(False, BOOL),
        "checkpoint_every": Field(500, INT, doc="optimizer steps between checkpoints"),
        "keep_checkpoints": Field(3, INT),
        "log_every": Field(20, INT),
        "eval_every": Field(1, INT, doc="epochs between evaluations"),
        "tensorboard": Field(True, BOOL),
        "progress": Field(True, BOOL),
    },
}


def _path(parts: Sequence[str]) -> str:
    return ".".join(parts) or "<root>"


def _check_value(field: Field, value: Any, where: str) -> Any:
    if value is None:
        if field.nullable or field.default is None:
            return None
        raise ConfigError(f"{where}: null is not allowed (default {field.default!r})")
    if field.types:
        ok = isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)
        if not ok:
            names = " or ".join(t.__name__ for t in field.types)
            raise ConfigError(f"{where}: expected {names}, got {value!r} ({type(value).__name__})")
    if field.types == FLOAT and isinstance(value, int):
        value = float(value)
    if field.choices is not None:
        allowed = field.choices() if callable(field.choices) else field.choices
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}{more}")
    return value


def _validate(schema: Schema, data: Any, parts: list[str]) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_path(parts)}: expected a mapping with keys {sorted(schema)}, got {data!r}")
    unknown = [k for k in data if k not in schema]
    if unknown:
        k = unknown[0]
        hint = difflib.get_close_matches(str(k), list(schema), n=1)
        more = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{_path([*parts, str(k)])}: unknown key; allowed keys here: {sorted(schema)}{more}")
    out: dict[str, Any] = {}
    for key, sub in schema.items():
        where = [*parts, key]
        if isinstance(sub, dict):
            out[key] = _validate(sub, data.get(key), where)
        else:
            out[key] = _check_value(sub, copy.deepcopy(data.get(key, sub.default)), _path(where))
    return out


def validate_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key and value against `SCHEMA` and fill the defaults; raises `ConfigError`."""
    out = _validate(SCHEMA, cfg, [])
    layers = out["model"]["llm"]["layers"]
    if isinstance(layers, int):
        out["model"]["llm"]["layers"] = [layers]
    elif not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"model.llm.layers: expected a list of layer indices, got {layers!r}")
    for key in ("batch_size", "num_workers", "image_size", "num_frames", "frame_stride", "sample_rate"):
        if out["data"][key] is not None and out["data"][key] < (0 if key == "num_workers" else 1):
            raise ConfigError(f"data.{key}: must be positive, got {out['data'][key]}")
    if out["data"]["num_points"] is not None and out["data"]["num_points"] < 1:
        raise ConfigError(f"data.num_points: must be positive or null, got {out['data']['num_points']}")
    for key in ("accum_steps", "epochs", "checkpoint_every", "log_every", "eval_every"):
        if out["train"][key] < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {out['train'][key]}")
    if out["train"]["lr"] <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {out['train']['lr']}")
    return out


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        try:
            return float(text)
        except ValueError:
            return value
    return value


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML: ``true``, ``[0, -1]``, ``3e-4``...)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node: dict[str, Any] = cfg
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {_path(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(text)
    return cfg


def load_config(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A validated config from a YAML path or a dict, with overrides applied; ``name`` defaults to the file stem."""
    if isinstance(source, Mapping):
        raw, stem = copy.deepcopy(dict(source)), None
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        stem = path.stem
    cfg = validate_config(apply_overrides(raw, overrides))
    if cfg["name"] is None:
        cfg["name"] = stem or "run"
    if cfg["train"]["out_dir"] is None:
        cfg["train"]["out_dir"] = str(Path("runs") / cfg["name"])
    return cfg


def dump_config(cfg: Mapping[str, Any]) -> str:
    """The config as YAML (what a run saves beside its checkpoints)."""
    return yaml.safe_dump(dict(cfg), sort_keys=False)

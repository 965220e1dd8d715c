"""YAML experiment configs: load, apply ``key=value`` overrides, migrate renamed keys, validate, fill defaults.

A config has four sections: ``task`` (what is learned), ``model`` (the encoder), ``data`` (shards and loader) and
``train`` (the `mmblocks.train.TrainSettings`). Components are named by registry names only (tasks, backbones or timm
ViT names, tokenizers, adapters, heads, LLM sources and tuning modes), never by import paths.

Each knob is written once, where it is consumed, and the schema is derived from there:

* ``train`` is the fields of `TrainSettings` (defaults, types, ``Literal`` choices, docs);
* ``model.llm`` is the signature of `mmblocks.llm.load_blocks` (plus ``enabled`` and ``tune_kwargs``);
* ``task``, ``model.backbone`` and ``model.head`` name a registry entry and take the keyword arguments of its
  constructor (`Component`): ``backbone: {name: ast_tiny, depth: 4}``;
* choice lists (attention modes, rope modes, datasets, modalities, augmentation presets, ...) are the constants and
  registries the code itself uses.

So the schema, the CLI help and the error messages cannot disagree with the implementation. Every validation error
names the key path, the bad value and what is allowed; a renamed key still loads, with a warning naming the new one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import os
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import MMBlocksError

__all__ = [
    "Component",
    "Config",
    "ConfigDeprecationWarning",
    "ConfigError",
    "Field",
    "apply_overrides",
    "dump_config",
    "field_for",
    "fields_from_dataclass",
    "fields_from_signature",
    "load_config",
    "schema",
    "validate_config",
]


class ConfigError(MMBlocksError, ValueError):
    """A config value or key that is not allowed; the message names the key path."""


class Config(dict):
    """A validated config (what `load_config` returns): ``load_config(config)`` gives it back as is, so a config is
    validated once however many builders it passes through."""


class ConfigDeprecationWarning(FutureWarning):
    """A renamed config key or value was used: the config still loads; the message names the new key."""


# ------------------------------------------------------------------------------------------------ schema nodes
@dataclass(frozen=True)
class Field:
    """One config key: default, accepted types, optional choices (a tuple or a callable returning one)."""

    default: Any
    types: tuple[type, ...] = ()
    choices: tuple[Any, ...] | Callable[[], Sequence[Any]] | None = None
    nullable: bool = False
    doc: str = ""
    open_mapping: bool = False  # a dict whose keys are passed through (e.g. tune_kwargs)


@dataclass(frozen=True)
class Component:
    """A section that names a registry entry (``name``) and takes the keyword arguments of its constructor beside it.

    Args:
        registry: returns the `Registry` (imported lazily).
        default: the entry used when ``name`` is absent (None: ``default_from`` decides).
        resolve: maps a config name to ``(entry, fixed arguments)`` (e.g. a timm ViT name to ``vit``).
        builder_args: constructor arguments the builder sets itself (widths, class counts, ...), not the config.
        defaults: config-level defaults that differ from the constructor's (e.g. a head's ``pool: null`` = the
            backbone's readout).
        default_from: the entry's name from the already validated config when neither given nor `default`.
    """

    registry: Callable[[], Any]
    default: str | None = None
    resolve: Callable[[str], tuple[str, dict[str, Any]]] | None = None
    builder_args: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_from: Callable[[dict[str, Any]], str] | None = None
    doc: str = ""


Schema = dict[str, "Field | Component | Schema"]
INT, FLOAT, BOOL, STR = (int,), (int, float), (bool,), (str,)


# ------------------------------------------------------------------------------------------------ derivation
def _annotation_members(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [m for arg in typing.get_args(annotation) for m in _annotation_members(arg)]
    return [annotation]


def field_for(annotation: Any, default: Any, doc: str = "") -> Field:
    """The `Field` of a parameter annotated `annotation` with `default`: ``Literal`` members give the choices,
    ``X | None`` nullability, ``bool`` / ``int`` / ``float`` / ``str`` / sequences / mappings the YAML types;
    anything else (a class, ``Any``) is not type-checked here (its constructor checks it)."""
    nullable = default is None
    accepted: list[type] = []
    choices: list[Any] = []
    checked = True
    open_mapping = False
    for member in _annotation_members(annotation):
        origin = typing.get_origin(member) or member
        if member is type(None):
            nullable = True
        elif origin is Literal:
            choices += list(typing.get_args(member))
            accepted += [type(c) for c in typing.get_args(member)]
        elif member is bool:
            accepted.append(bool)
        elif member is int:
            accepted.append(int)
        elif member is float:
            accepted += [int, float]
        elif member is str or member is os.PathLike or origin is os.PathLike:
            accepted.append(str)
        elif origin in (list, tuple, range, Sequence, Iterable, typing.Sequence):
            accepted.append(list)
        elif origin in (dict, Mapping, typing.Mapping):
            accepted.append(dict)
            open_mapping = True
        else:  # Any, torch.dtype, a schedule object, ...: the constructor validates it
            checked = False
    # unchecked members (a class, Any) accept anything, unless a Literal names what a YAML value can be
    # (e.g. `DTypeName | torch.dtype`: a config can only give the names)
    kinds = tuple(dict.fromkeys(accepted)) if checked or choices else ()
    return Field(
        default,
        kinds,
        tuple(choices) or None,
        nullable=nullable,
        doc=doc,
        open_mapping=open_mapping or not checked,
    )


def _type_hints(obj: Any) -> dict[str, Any]:
    while isinstance(obj, functools.partial):
        obj = obj.func
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve at run time: no type checks for that callable
        return {}


def fields_from_signature(
    fn: Callable[..., Any],
    *,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    docs: Mapping[str, str] | None = None,
) -> dict[str, Field]:
    """One `Field` per keyword parameter of `fn` (a function, class or partial), from its annotations and defaults;
    `defaults` replace or supply defaults (for parameters without one), `skip` leaves parameters out."""
    hints = _type_hints(fn)
    defaults, docs, skip = dict(defaults or {}), dict(docs or {}), set(skip)
    out = {}
    keep = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind not in keep or name in skip:
            continue
        default = defaults.get(name, None if p.default is inspect.Parameter.empty else p.default)
        out[name] = field_for(hints.get(name, Any), default, docs.get(name, ""))
        if name not in defaults and p.default is inspect.Parameter.empty:
            out[name] = dataclasses.replace(out[name], default=_REQUIRED)
    return out


def fields_from_dataclass(cls: type) -> dict[str, Field]:
    """One `Field` per field of dataclass `cls` (defaults, annotations, ``metadata["doc"]``)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = field_for(hints[f.name], default, f.metadata.get("doc", ""))
    return out


class _Required:
    def __repr__(self) -> str:
        return "<required>"


_REQUIRED = _Required()  # a constructor argument without default: the builder supplies it unless the config does


# ------------------------------------------------------------------------------------------------ the schema
def _tasks():
    from .tasks import TASKS

    return TASKS


def _backbones():
    from .models import BACKBONES

    return BACKBONES


def _resolve_backbone(name: str) -> tuple[str, dict[str, Any]]:
    from .models import resolve_backbone

    return resolve_backbone(name)


def _heads():
    from .heads import HEADS

    return HEADS


def _task_head(cfg: dict[str, Any]) -> str:
    return _tasks().get(cfg["task"]["name"]).default_head


def _adapters() -> list[str]:
    from adapters import list_adapters

    return list_adapters()


def _tokenizers() -> list[str]:
    from tokenizers_mm import list_tokenizers

    return list_tokenizers()


def _datasets() -> list[str]:
    from .data import list_datasets

    return list_datasets()


def _modalities() -> list[str]:
    from .data import list_codecs

    return list_codecs()


def _augment_presets() -> tuple[str, ...]:
    from .data.codecs import augment_presets

    return augment_presets()


def _frame_samplings() -> tuple[str, ...]:
    from .data.codecs import FRAME_SAMPLINGS

    return FRAME_SAMPLINGS


def _channels() -> tuple[int, ...]:
    from .data.transforms import CHANNELS

    return CHANNELS


def _llm_fields() -> dict[str, Field]:
    from .llm import load_blocks

    return fields_from_signature(
        load_blocks,
        defaults={"source": "smollm2-135m", "layers": [-1]},
        docs={
            "source": "a local HF folder, a .gguf file, an offline name (smollm2-135m) or random:<family>",
            "layers": "layer indices (negative from the end), applied in this order",
            "config_overrides": "config fields for random:<family> sources",
            "seed": "random-init seed (default: train.seed)",
            "soft_mask": "the schedule of attention: soft (mode/cutoff/unit/r_start/r_end, or a fixed ratio)",
        },
    )


def _train_fields() -> dict[str, Field]:
    from .train.settings import TrainSettings

    return fields_from_dataclass(TrainSettings)


#: Constructor arguments of a backbone that the encoder builder sets (channels of the data, own tokenizer or not).
BACKBONE_BUILDER_ARGS = ("in_chans", "own_tokenizer", "image_tokenizer", "tokenizer_factory", "vit")

_BASE_SCHEMA: Schema = {
    "name": Field(None, STR, nullable=True, doc="run name (default: the config file name)"),
    "task": Component(
        _tasks,
        default="classification",
        builder_args=("num_classes", "class_names"),
        doc="what is learned: a registered task (num_classes comes from model.num_classes or the shards)",
    ),
    "model": {
        "tokenizer": {
            "name": Field(
                None,
                STR,
                nullable=True,
                choices=_tokenizers,
                doc="a registered tokenizer; null: the backbone's own (a ViT's patches, AST's spectrogram patches)",
            ),
            "kwargs": Field({}, (dict,), open_mapping=True, doc="tokenizer arguments (embed_dim = backbone width)"),
        },
        "backbone": Component(
            _backbones,
            default="vit_tiny_patch16_224",
            resolve=_resolve_backbone,
            builder_args=BACKBONE_BUILDER_ARGS,
            doc="a registered backbone (vit, causal_vit, point_transformer, ast_tiny, videomae_small, ...) or any "
            "timm ViT name, with its constructor arguments",
        ),
        "llm": {  # between these two: the keyword arguments of load_blocks (`schema()`)
            "enabled": Field(False, BOOL, doc="insert LLM blocks (adapter_in -> blocks -> adapter_out)"),
            "tune_kwargs": Field({}, (dict,), open_mapping=True, doc="options of the tuning mode (TUNE_KWARGS)"),
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
        "head": Component(
            _heads,
            builder_args=("in_dim", "num_classes"),
            defaults={"pool": None},
            default_from=_task_head,
            doc="the task's head (default: the task's own, e.g. classifier); pool null: the backbone's readout",
        ),
        "num_classes": Field(None, INT, nullable=True, doc="default: from the shards' index.json"),
        "init": {
            "checkpoint": Field(None, STR, nullable=True, doc="an mmblocks checkpoint to initialise stages from"),
            "stages": Field(["tokenizer", "backbone"], (list,), doc="stages read from init.checkpoint"),
        },
        "freeze": Field([], (list,), doc="stages without gradients: tokenizer, backbone, llm_stage, head"),
    },
    "data": {
        "dataset": Field(
            None, STR, nullable=True, choices=_datasets, doc="an offline dataset made into `root` when missing"
        ),
        "modality": Field(None, STR, nullable=True, choices=_modalities, doc="default: the index's"),
        "root": Field("runs/data", STR, doc="folder with index.json and the shards"),
        "train_split": Field("train", STR),
        "val_split": Field("val", STR, nullable=True),
        "test_split": Field("test", STR, nullable=True),
        "image_size": Field(32, INT, nullable=True, doc="images: crop/resize side; video: resize frames (null: keep)"),
        "channels": Field(3, INT, choices=_channels),
        "batch_size": Field(64, INT),
        "eval_batch_size": Field(None, INT, nullable=True),
        "num_workers": Field(2, INT),
        "augment": Field(True, BOOL),
        "augment_policy": Field(
            None,
            STR,
            nullable=True,
            choices=_augment_presets,
            doc="augmentation preset when augment is true (images light|crop, points scale_translate|rotate)",
        ),
        "num_points": Field(None, INT, nullable=True, doc="points kept per cloud (null: all)"),
        "sample_rate": Field(16000, INT, doc="audio rate the model expects (files are resampled)"),
        "max_seconds": Field(None, FLOAT, nullable=True, doc="crop longer audio clips"),
        "num_frames": Field(16, INT, doc="video frames per clip"),
        "frame_sampling": Field("uniform", STR, choices=_frame_samplings),
        "frame_stride": Field(1, INT),
        "motion_vectors": Field(False, BOOL, doc="decode the codec motion vectors (batch.extra['motion'])"),
        "resampled": Field(False, BOOL, doc="infinite resampled shards (step-based training)"),
    },
    "train": {},  # the fields of TrainSettings (`schema()`)
}


@functools.lru_cache(maxsize=1)
def schema() -> Schema:
    """The config schema: the hand-written sections with those derived from code filled in (``model.llm`` from
    `load_blocks`, ``train`` from `TrainSettings`; components from their registries when validated)."""
    out = copy.deepcopy(_BASE_SCHEMA)
    llm = out["model"]["llm"]
    out["model"]["llm"] = {"enabled": llm["enabled"], **_llm_fields(), "tune_kwargs": llm["tune_kwargs"]}
    out["train"] = _train_fields()
    return out


# ------------------------------------------------------------------------------------------------ validation
def _path(parts: Sequence[str]) -> str:
    return ".".join(parts) or "<root>"


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    hint = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def _check_value(f: Field, value: Any, where: str) -> Any:
    if value is None:
        if f.nullable or f.default is None:
            return None
        raise ConfigError(f"{where}: null is not allowed (default {f.default!r})")
    if f.types:
        ok = isinstance(value, f.types) and not (isinstance(value, bool) and bool not in f.types)
        if not ok:
            names = " or ".join(t.__name__ for t in f.types)
            raise ConfigError(f"{where}: expected {names}, got {value!r} ({type(value).__name__})")
    if f.types == FLOAT and isinstance(value, int):
        value = float(value)
    if f.choices is not None:
        allowed = f.choices() if callable(f.choices) else f.choices
        kinds = {type(a) for a in allowed}
        if type(value) in kinds and value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}{_did_you_mean(value, allowed)}")
    return value


def _unknown_key(key: str, allowed: Iterable[str], parts: list[str]) -> ConfigError:
    allowed = sorted(allowed)
    return ConfigError(
        f"{_path([*parts, str(key)])}: unknown key; allowed keys here: {allowed}{_did_you_mean(key, allowed)}"
    )


def _validate_component(comp: Component, data: Any, parts: list[str], cfg: dict[str, Any]) -> dict[str, Any]:
    from tokenizers_mm.registry import RegistryError

    if data is None:
        data = {}
    if isinstance(data, str):  # shorthand: `task: classification`
        data = {"name": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_path(parts)}: expected a mapping with a name and its options, got {data!r}")
    name = data.get("name") or comp.default or (comp.default_from(cfg) if comp.default_from else None)
    registry = comp.registry()
    where = _path([*parts, "name"])
    if not isinstance(name, str):
        raise ConfigError(f"{where}: expected a {registry.kind} name, got {name!r}")
    try:
        entry, fixed = comp.resolve(name) if comp.resolve is not None else (name, {})
        entry_fn = registry.get(entry)
    except RegistryError as err:
        raise ConfigError(f"{where}: {err}") from None
    fields = fields_from_signature(entry_fn, skip=(*comp.builder_args, *fixed), defaults=comp.defaults)
    for key, default in comp.defaults.items():
        if key in fields:
            fields[key] = dataclasses.replace(fields[key], default=default, nullable=True)
    unknown = [k for k in data if k != "name" and k not in fields]
    if unknown:
        raise _unknown_key(unknown[0], ["name", *fields], parts)
    out: dict[str, Any] = {"name": name}
    for key, f in fields.items():
        if key in data:
            out[key] = _check_value(f, copy.deepcopy(data[key]), _path([*parts, key]))
        elif f.default is not _REQUIRED:
            out[key] = copy.deepcopy(f.default)
    return out


def _validate(node: Schema, data: Any, parts: list[str], cfg: dict[str, Any]) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_path(parts)}: expected a mapping with keys {sorted(node)}, got {data!r}")
    unknown = [k for k in data if k not in node]
    if unknown:
        raise _unknown_key(unknown[0], node, parts)
    out: dict[str, Any] = cfg if not parts else {}
    for key, sub in node.items():
        where = [*parts, key]
        if isinstance(sub, dict):
            out[key] = _validate(sub, data.get(key), where, cfg)
        elif isinstance(sub, Component):
            out[key] = _validate_component(sub, data.get(key), where, cfg)
        else:
            out[key] = _check_value(sub, copy.deepcopy(data.get(key, sub.default)), _path(where))
    return out


def validate_config(cfg: Mapping[str, Any]) -> Config:
    """Check every key and value against the schema and fill the defaults; raises `ConfigError`."""
    out: dict[str, Any] = {}
    _validate(schema(), _migrate(copy.deepcopy(dict(cfg))), [], out)
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
    from .llm.tuning import TUNE_KWARGS
    from .train.settings import TrainSettings

    llm = out["model"]["llm"]
    unknown = sorted(set(llm["tune_kwargs"]) - set(TUNE_KWARGS[llm["tune"]]))
    if unknown:
        allowed = sorted(TUNE_KWARGS[llm["tune"]]) or "no options"
        raise ConfigError(f"model.llm.tune_kwargs: tune={llm['tune']!r} takes {allowed}, got {unknown}")
    try:
        TrainSettings(**out["train"])
    except ValueError as err:
        raise ConfigError(f"train.{err}") from None
    return Config(out)


# ------------------------------------------------------------------------------------------------ renamed keys
def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"config key {old} is deprecated: {new}", ConfigDeprecationWarning, stacklevel=4)


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite keys and values renamed since earlier releases into today's, with a `ConfigDeprecationWarning`
    naming the new key for each."""
    model = raw.get("model")
    if isinstance(model, dict):
        backbone = model.get("backbone")
        if isinstance(backbone, dict) and "type" in backbone:
            kind = backbone.pop("type")
            if kind != "vit":  # the old flat schema's `name` was the timm name, which only `vit` used
                backbone.pop("name", None)
                backbone["name"] = kind
            _deprecated(
                "model.backbone.type",
                f"name the backbone with model.backbone.name (here {backbone.get('name', 'vit_tiny_patch16_224')!r}; "
                "a registered backbone or a timm ViT name)",
            )
        tokenizer = model.get("tokenizer")
        if isinstance(tokenizer, dict) and tokenizer.get("name") == "image_patches_cls_last":
            own = isinstance(backbone, dict) and backbone.get("name") in (None, "causal_vit")
            tokenizer["name"] = None if own else "image_patches"
            if not own:
                tokenizer["kwargs"] = {**(tokenizer.get("kwargs") or {}), "cls_position": "last"}
            _deprecated(
                "model.tokenizer.name: image_patches_cls_last",
                "it is image_patches with kwargs {cls_position: last} (a causal_vit backbone builds it itself: "
                "leave model.tokenizer.name null)",
            )
    train = raw.get("train")
    if isinstance(train, dict) and "label_smoothing" in train:
        task = raw.get("task")
        task = {"name": task} if isinstance(task, str) else dict(task or {})
        task.setdefault("label_smoothing", train.pop("label_smoothing"))
        raw["task"] = task
        _deprecated("train.label_smoothing", "the classification task's option: task.label_smoothing")
    return raw


# ------------------------------------------------------------------------------------------------ loading
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
            nxt = node.get(part)
            if isinstance(nxt, str) and i == 0 and part == "task":  # `task: classification` shorthand
                nxt = node[part] = {"name": nxt}
            nxt = node.setdefault(part, {}) if nxt is None else nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {_path(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(text)
    return cfg


def load_config(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A validated config from a YAML path or a dict, with overrides applied; ``name`` defaults to the file stem.
    A `Config` (already validated) without overrides is returned as is."""
    if isinstance(source, Config) and not overrides:
        return source
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

"""Load a YAML config (or a dict), apply ``key=value`` overrides, migrate renamed keys, validate against the schema and
fill the defaults. Every validation error names the key path, the bad value and what is allowed."""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tokenizers_mm.registry import RegistryError

from ..errors import MMBlocksError
from .fields import FLOAT, REQUIRED, Component, Field, Schema, fields_from_signature
from .migrate import migrate
from .schema import schema

__all__ = ["Config", "ConfigError", "apply_overrides", "dump_config", "load_config", "validate_config"]


class ConfigError(MMBlocksError, ValueError):
    """A config value or key that is not allowed; the message names the key path."""


class Config(dict):
    """A validated config (what `load_config` returns): ``load_config(config)`` gives it back as is, so a config is
    validated once however many builders it passes through."""


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
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}{_did_you_mean(value, allowed)}")
    return value


def _unknown_key(key: str, allowed: Iterable[str], parts: list[str]) -> ConfigError:
    allowed = sorted(allowed)
    return ConfigError(
        f"{_path([*parts, str(key)])}: unknown key; allowed keys here: {allowed}{_did_you_mean(key, allowed)}"
    )


def _validate_component(comp: Component, data: Any, parts: list[str], cfg: dict[str, Any]) -> dict[str, Any] | None:
    if data is None and comp.optional:
        return None
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
    builder_args = comp.builder_args(entry) if callable(comp.builder_args) else comp.builder_args
    fields = fields_from_signature(entry_fn, skip=(*builder_args, *fixed), defaults=comp.defaults)
    unknown = [k for k in data if k != "name" and k not in fields]
    if unknown:
        raise _unknown_key(unknown[0], ["name", *fields], parts)
    out: dict[str, Any] = {"name": name}
    for key, f in fields.items():
        if key in data:
            out[key] = _check_value(f, copy.deepcopy(data[key]), _path([*parts, key]))
        elif f.default is not REQUIRED:
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


def validate_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key and value against the schema and fill the defaults; raises `ConfigError`."""
    out: dict[str, Any] = {}
    _validate(schema(), migrate(copy.deepcopy(dict(cfg))), [], out)
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
    lost = out["data"]["max_lost_fraction"]
    if lost is not None and not 0 <= lost <= 1:
        raise ConfigError(f"data.max_lost_fraction: a fraction in [0, 1] or null, got {lost}")
    from ..llm.tuning import TUNE_KWARGS
    from ..train.settings import TrainSettings

    llm = out["model"]["llm"]
    unknown = sorted(set(llm["tune_kwargs"]) - set(TUNE_KWARGS[llm["tune"]]))
    if unknown:
        allowed = sorted(TUNE_KWARGS[llm["tune"]]) or "no options"
        raise ConfigError(f"model.llm.tune_kwargs: tune={llm['tune']!r} takes {allowed}, got {unknown}")
    try:
        TrainSettings(**out["train"])
    except ValueError as err:
        raise ConfigError(f"train.{err}") from None
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
            nxt = node.get(part)
            if isinstance(nxt, str):  # a component named in short (`task: classification`) gets an option
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
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a text (UTF-8) file: {err}") from err
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections (task:, model:, data:, train:), "
                f"not a {type(raw).__name__}"
            )
        stem = path.stem
    cfg = Config(validate_config(apply_overrides(raw, overrides)))
    if cfg["name"] is None:
        cfg["name"] = stem or "run"
    if cfg["train"]["out_dir"] is None:
        cfg["train"]["out_dir"] = str(Path("runs") / cfg["name"])
    return cfg


def dump_config(cfg: Mapping[str, Any]) -> str:
    """The config as YAML (what a run saves beside its checkpoints)."""
    return yaml.safe_dump(dict(cfg), sort_keys=False)

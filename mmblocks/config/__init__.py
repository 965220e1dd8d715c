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

from .fields import Component, Field, field_for, fields_from_dataclass, fields_from_signature
from .load import Config, ConfigError, apply_overrides, dump_config, load_config, validate_config
from .migrate import ConfigDeprecationWarning
from .schema import schema

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

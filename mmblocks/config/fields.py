"""Config fields derived from code: a constructor's signature or a dataclass gives the keys, defaults, YAML types and
choices of a config section, so a knob is declared once, where it is consumed."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "INT",
    "FLOAT",
    "BOOL",
    "STR",
    "REQUIRED",
    "Component",
    "Field",
    "Schema",
    "field_for",
    "fields_from_dataclass",
    "fields_from_signature",
]


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
        builder_args: constructor arguments the builder sets itself (widths, class counts, ...), not the config; or
            a function of the entry's name giving them.
        defaults: config-level defaults that differ from the constructor's (e.g. a head's ``pool: null`` = the
            backbone's readout).
        default_from: the entry's name from the already validated config when neither given nor `default`.
        optional: an absent (or null) section stays None: the part is not built.
    """

    registry: Callable[[], Any]
    default: str | None = None
    resolve: Callable[[str], tuple[str, dict[str, Any]]] | None = None
    builder_args: tuple[str, ...] | Callable[[str], tuple[str, ...]] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_from: Callable[[dict[str, Any]], str] | None = None
    doc: str = ""
    optional: bool = False


Schema = dict[str, "Field | Component | Schema"]
INT, FLOAT, BOOL, STR = (int,), (int, float), (bool,), (str,)


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
            out[name] = dataclasses.replace(out[name], default=REQUIRED)
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


REQUIRED = _Required()  # a constructor argument without default: the builder supplies it unless the config does

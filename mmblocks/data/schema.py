"""The on-disk format of a shard set: sample keys per modality and the ``index.json`` that describes the shards.

A shard set is one folder::

    out/
      index.json
      train-000000.tar  train-000001.tar  ...
      val-000000.tar
      test-000000.tar

Each ``.tar`` is a plain POSIX tar archive in the WebDataset layout: the files of one sample share a key
(``train-0000042.png``, ``train-0000042.cls``, ``train-0000042.json``) and appear next to each other. Keys per
sample (design §6): ``jpg|jpeg|png|webp`` encoded image, ``flac|wav`` audio, ``npy`` point cloud ``[P, 3+C]``
float32, ``mp4`` video, ``cls`` integer label as ASCII digits, ``txt`` caption or transcript (UTF-8), ``json``
free-form metadata. A folder holds one modality, named as in `MODALITY_KEYS` (``image``, ``audio``, ``points``,
``video``; the same names as ``Tokens.modality`` and ``mmblocks shards write --modality``).

``index.json`` (``format_version`` 1)::

    {
      "format": "mmblocks-wds",
      "format_version": 1,
      "modality": "image",
      "class_names": ["cat", "dog"],
      "num_classes": 2,
      "command": "<the last command that wrote a split>",
      "dataset": {...free-form description, e.g. the crop regions of `textures`...},
      "splits": {
        "train": {
          "num_samples": 1257,
          "shards": [{"name": "train-000000.tar", "count": 500, "bytes": 747520}, ...],
          "command": "<the command that wrote this split>",
          "created": "2025-01-01T00:00:00+00:00",
          "extensions": ["cls", "json", "png"]
        }
      }
    }

Shard names in the index are relative to the folder. ``bytes`` is the exact file size; readers use it to notice
an index that no longer matches its shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MMBlocksError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_KEYS",
    "INDEX_NAME",
    "FIELD_KEYS",
    "LABEL_KEY",
    "META_KEY",
    "TEXT_KEY",
    "MODALITY_KEYS",
    "DatasetIndex",
    "ShardIndexError",
    "ShardInfo",
    "SplitInfo",
    "index_lock",
    "read_index",
    "shard_name",
    "write_index",
]

FORMAT_NAME = "mmblocks-wds"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
LABEL_KEY = "cls"
TEXT_KEY = "txt"
META_KEY = "json"
#: Per-sample keys besides the media that the loader decodes into batch fields (design §6).
FIELD_KEYS: tuple[str, ...] = (LABEL_KEY, TEXT_KEY, META_KEY)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MODALITY_KEYS: dict[str, tuple[str, ...]] = {
    "image": IMAGE_KEYS,
    "audio": ("flac", "wav"),
    "points": ("npy",),
    "video": ("mp4",),
}


class ShardIndexError(MMBlocksError, ValueError):
    """An ``index.json`` that is missing, malformed, or does not match the shards beside it."""


def shard_name(split: str, i: int) -> str:
    """``{split}-{i:06d}.tar``."""
    return f"{split}-{i:06d}.tar"


@dataclass
class ShardInfo:
    """One shard: file name relative to the index folder, number of samples, file size in bytes."""

    name: str
    count: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "bytes": self.bytes}


@dataclass
class SplitInfo:
    """The shards of one split, in write order."""

    shards: list[ShardInfo]
    command: str | None = None
    created: str | None = None
    extensions: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "shards": [s.to_json() for s in self.shards],
            "command": self.command,
            "created": self.created,
            "extensions": list(self.extensions),
        }


@dataclass
class DatasetIndex:
    """The parsed ``index.json`` of a shard folder."""

    modality: str = "image"
    class_names: list[str] | None = None
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    command: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    def split(self, name: str) -> SplitInfo:
        """The split called `name`; a clear error listing the known splits otherwise."""
        if name not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise ShardIndexError(f"split {name!r} is not in the index (splits: {known})")
        return self.splits[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "modality": self.modality,
            "class_names": self.class_names,
            "num_classes": self.num_classes,
            "command": self.command,
            "dataset": self.dataset,
            "splits": {name: info.to_json() for name, info in sorted(self.splits.items())},
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "index.json") -> DatasetIndex:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise ShardIndexError(f"{where}: not an mmblocks shard index (expected 'format': {FORMAT_NAME!r})")
        version = obj.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ShardIndexError(
                f"{where}: format_version {version!r} is not supported (this mmblocks reads <= {FORMAT_VERSION})"
            )
        try:
            splits = {
                name: SplitInfo(
                    shards=[ShardInfo(str(s["name"]), int(s["count"]), int(s["bytes"])) for s in info["shards"]],
                    command=info.get("command"),
                    created=info.get("created"),
                    extensions=list(info.get("extensions", [])),
                )
                for name, info in obj.get("splits", {}).items()
            }
        except (KeyError, TypeError, ValueError) as exn:
            raise ShardIndexError(f"{where}: malformed split entry ({exn!r})") from exn
        return cls(
            modality=obj.get("modality", "image"),
            class_names=obj.get("class_names"),
            splits=splits,
            command=obj.get("command"),
            dataset=obj.get("dataset") or {},
            format_version=version,
        )


def read_index(folder: str | os.PathLike) -> DatasetIndex | None:
    """The ``index.json`` of `folder`, or None when there is none."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exn:
        raise ShardIndexError(f"{path}: not valid JSON ({exn})") from exn
    return DatasetIndex.from_json(obj, where=str(path))


def write_index(folder: str | os.PathLike, index: DatasetIndex) -> Path:
    """Write ``index.json`` atomically: a temp file in the same folder, fsync, then `os.replace`."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    text = json.dumps(index.to_json(), indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{INDEX_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def default_file_mode() -> int:
    """``0o666`` minus the process umask: what `open` would give (`tempfile.mkstemp` makes files ``0o600``)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def index_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (``flock`` on the folder itself, so no lock file is left behind) that makes the
    read-modify-write of ``index.json`` safe when two processes write different splits of one folder at once.
    No-op where `fcntl` is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock

"""Write WebDataset shards atomically, with an ``index.json``, from samples, an ImageFolder tree or a manifest.

`write_shards` is the one writer; `write_from_folder` and `write_from_manifest` (CLI: ``mmblocks shards write``)
build its sample stream. Guarantees:

* every shard is written to a hidden temp file in the output folder and `os.replace`d to ``{split}-{i:06d}.tar``
  only once the whole split has been written, so a reader never sees a half-written shard and a failed write
  leaves the previous version of the split untouched (temp files are removed on any error);
* ``index.json`` is updated under an advisory lock and replaced atomically, so writing ``val`` after ``train``
  (even from another process) keeps both splits;
* shard files of the split that the new version no longer has (``train-000007.tar`` after a rewrite with fewer
  shards) are removed;
* encoded media are stored byte for byte; only a PIL image or an array given for an image key is encoded (PNG for
  ``png``, JPEG quality 95 for ``jpg``, lossless WebP for ``webp``) and an array given for ``npy`` is saved as
  ``.npy``;
* the folder and manifest writers validate points / audio / video files before storing them (``.npy`` ``[P, 3+C]``
  float, ``.flac``/``.wav`` decoded with soundfile, ``.mp4`` opened with PyAV) and record what they found (points,
  sample rate, duration, frames, fps ...) in each sample's ``json``; a bad file raises `ShardWriteError` naming it.

The shards are plain POSIX tar files: ``tar tf``, `tarfile` and `webdataset.WebDataset` read them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from ..errors import MMBlocksError
from .schema import (
    IMAGE_KEYS,
    LABEL_KEY,
    MODALITY_KEYS,
    DatasetIndex,
    ShardInfo,
    SplitInfo,
    default_file_mode,
    index_lock,
    read_index,
    shard_name,
    write_index,
)

__all__ = [
    "FILE_EXTENSIONS",
    "ShardWriteError",
    "parse_size",
    "write_from_folder",
    "write_from_manifest",
    "write_shards",
]

logger = logging.getLogger("mmblocks.data")

DEFAULT_MAX_COUNT = 10_000
DEFAULT_MAX_BYTES = 1_000_000_000

#: File extensions stored as is, per modality, and the sample key each becomes.
FILE_EXTENSIONS: dict[str, dict[str, str]] = {
    "image": {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"},
    "audio": {".flac": "flac", ".wav": "wav"},
    "points": {".npy": "npy"},
    "video": {".mp4": "mp4"},
}
#: Image files PIL reads that are stored only when re-encoding is asked for (``reencode="png"``).
REENCODABLE = {".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".tga"}

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK
_META_FIELDS = {"__url__", "__local_path__", "__worker__", "__rank__", "__nodeinfo__"}


class ShardWriteError(MMBlocksError, ValueError):
    """Bad input for a shard writer: an invalid sample, a missing file, an unknown extension, an empty folder."""


def parse_size(value: int | float | str) -> int:
    """Bytes from ``1000000``, ``"500MB"``, ``"1.5GiB"`` or ``"64k"`` (decimal for kB/MB/GB, binary for KiB/...)."""
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(value))
    if not m:
        raise ShardWriteError(f"cannot parse a size from {value!r} (examples: 1000000, 500MB, 1.5GiB)")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** " kmgt".index(unit or " "))


# --------------------------------------------------------------------------------------------------- encoding


def _encode_image(value: Any, ext: str) -> bytes:
    from PIL import Image

    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            raise ShardWriteError(f"an image array must be uint8 or bool to be encoded, got {arr.dtype}")
        value = Image.fromarray(arr)
    if not isinstance(value, Image.Image):
        raise ShardWriteError(f"'{ext}' must be encoded bytes, a PIL image or a uint8 array, got {type(value)}")
    buf = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        value.convert("RGB" if value.mode not in ("L", "RGB") else value.mode).save(buf, "JPEG", quality=95)
    elif ext == "png":
        value.save(buf, "PNG")
    else:
        value.save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def _encode_value(ext: str, value: Any, key: str) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if ext in IMAGE_KEYS:
        return _encode_image(value, ext)
    if ext in ("cls", "cls2", "index", "id"):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ShardWriteError(f"sample {key!r}: '{ext}' must be an int, got {value!r}")
        return str(int(value)).encode("ascii")
    if ext in ("json", "jsn"):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    if ext == "npy" and isinstance(value, np.ndarray):
        return wds.numpy_dumps(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ShardWriteError(f"sample {key!r}: cannot store {type(value).__name__} under '{ext}' (give bytes)")


def _encode_sample(
    sample: dict[str, Any], modality: str, num_classes: int | None, seen: set[str]
) -> tuple[str, dict[str, bytes]]:
    if not isinstance(sample, dict):
        raise ShardWriteError(f"a sample must be a dict, got {type(sample).__name__}")
    key = sample.get("__key__")
    if not isinstance(key, str) or not key:
        raise ShardWriteError(f"every sample needs a non-empty string '__key__' (got {key!r}, fields {sorted(sample)})")
    if not _KEY_RE.match(key) or key.startswith("/") or key.endswith("/") or "//" in key:
        raise ShardWriteError(
            f"sample key {key!r}: use letters, digits, '_', '-' and '/' only (a '.' would split the key in readers)"
        )
    if key in seen:
        raise ShardWriteError(f"duplicate sample key {key!r}")
    seen.add(key)
    media = MODALITY_KEYS[modality]
    if not any(k in sample for k in media):
        raise ShardWriteError(
            f"sample {key!r} has no {modality} key (expected one of {', '.join(media)}; fields: {sorted(sample)})"
        )
    out: dict[str, bytes] = {}
    for ext, value in sample.items():
        if ext == "__key__" or ext in _META_FIELDS:
            continue
        if not isinstance(ext, str) or not re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)*", ext) or ext.startswith("_"):
            raise ShardWriteError(f"sample {key!r}: field name {ext!r} must be a lower-case extension such as 'png'")
        if value is None:
            continue
        out[ext] = _encode_value(ext, value, key)
    if LABEL_KEY in out and not re.fullmatch(rb"\d+", out[LABEL_KEY]):
        raise ShardWriteError(f"sample {key!r}: '{LABEL_KEY}' must be a non-negative int, got {out[LABEL_KEY]!r}")
    if LABEL_KEY in out and num_classes is not None:
        label = int(out[LABEL_KEY])
        if not 0 <= label < num_classes:
            raise ShardWriteError(f"sample {key!r}: label {label} is outside 0..{num_classes - 1} (class_names)")
    return key, out


def _tar_size(key: str, fields: dict[str, bytes]) -> int:
    """Bytes the sample takes in a tar stream: a header block per member (two more for a long name) + padded data."""
    total = 0
    for ext, data in fields.items():
        name = f"{key}.{ext}"
        header = _TAR_BLOCK if len(name.encode()) <= 100 and name.isascii() else 3 * _TAR_BLOCK
        total += header + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
    return total


def _finished_size(payload: int) -> int:
    """File size of a tar with `payload` member bytes: two zero blocks, padded to a 10 KiB record."""
    return -(-(payload + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


# ---------------------------------------------------------------------------------------------------- writing


class _SplitWriter:
    """Rolls samples over temp shard files; `commit` renames them all into place."""

    def __init__(self, out_dir: Path, split: str, max_count: int, max_bytes: int, mtime: int):
        self.out_dir, self.split = out_dir, split
        self.max_count, self.max_bytes, self.mtime = max_count, max_bytes, mtime
        self.done: list[tuple[str, ShardInfo]] = []  # (temp path, final info)
        self.tmp: str | None = None
        self.file = None
        self.writer: wds.TarWriter | None = None
        self.count = 0
        self.payload = 0

    def _open(self) -> None:
        name = shard_name(self.split, len(self.done))
        fd, self.tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{name}.", suffix=".tmp")
        self.file = os.fdopen(fd, "wb")
        # PAX: long or non-ASCII member names are stored exactly; fixed mtime: same input -> same bytes.
        self.writer = wds.TarWriter(self.file, encoder=False, mtime=self.mtime, format="PAX_FORMAT")
        self.count = self.payload = 0

    def _close(self) -> None:
        assert self.writer is not None and self.file is not None and self.tmp is not None
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        name = shard_name(self.split, len(self.done))
        self.done.append((self.tmp, ShardInfo(name, self.count, os.path.getsize(self.tmp))))
        self.writer = self.file = self.tmp = None

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        size = _tar_size(key, fields)
        if self.writer is not None and (
            self.count >= self.max_count or _finished_size(self.payload + size) > self.max_bytes
        ):
            self._close()
        if self.writer is None:
            self._open()
        assert self.writer is not None
        self.writer.write({"__key__": key, **fields})
        self.count += 1
        self.payload += size

    def commit(self) -> list[ShardInfo]:
        if self.writer is not None:
            self._close()
        mode = default_file_mode()
        for tmp, _ in self.done:
            os.chmod(tmp, mode)
        for tmp, info in self.done:
            os.replace(tmp, self.out_dir / info.name)
        with contextlib.suppress(OSError):  # make the renames durable
            fd = os.open(self.out_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        infos = [info for _, info in self.done]
        self.done = []
        return infos

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self.writer is not None:
                self.writer.close()
        with contextlib.suppress(Exception):
            if self.file is not None:
                self.file.close()
        for tmp in [self.tmp] + [t for t, _ in self.done]:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self.done, self.tmp, self.writer, self.file = [], None, None, None


def _default_command(func: str, **kw: Any) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items() if v is not None)
    return f"mmblocks.data.{func}({args})"


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    split: str,
    *,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int | str = DEFAULT_MAX_BYTES,
    modality: str = "image",
    class_names: Sequence[str] | None = None,
    command: str | None = None,
    dataset: dict[str, Any] | None = None,
    total: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `samples` as the shards ``{split}-{i:06d}.tar`` of `out_dir` and record the split in ``index.json``.

    Args:
        samples: dicts with ``__key__`` (letters, digits, ``_``, ``-``, ``/``; unique) and per design §6 the media
            key of `modality` (image: ``jpg|jpeg|png|webp`` as encoded bytes, kept as is; a PIL image or uint8
            array is encoded), optional ``cls`` (int), ``txt`` (str), ``json`` (JSON-serialisable) and any other
            lower-case extension with bytes. ``__url__``-style reader metadata is dropped.
        out_dir: output folder (created).
        split: split name (``train``, ``val``, ``test``, ...).
        max_count: at most this many samples per shard.
        max_bytes: a shard file stays at or under this size unless a single sample is larger (int or ``"500MB"``).
        modality: ``image``, ``audio``, ``points`` or ``video``; fixed per folder.
        class_names: label names (index = ``cls``); must agree with the folder's index if it has names.
        command: the command line recorded in the index (default: a description of this call).
        dataset: free-form description merged into the index's ``dataset`` entry (e.g. crop regions).
        total: number of samples, for the progress bar only.
        progress: show a tqdm progress bar (on a terminal).
        overwrite: replace `split` when the folder's index already has it (else `ShardWriteError`, before anything is
            written); the folder and manifest writers take it too (``mmblocks shards write --overwrite``).

    Returns:
        the updated ``index.json`` contents (``result["splits"][split]["num_samples"]`` etc.).

    Raises:
        ShardWriteError: an invalid sample (missing key, duplicate key, label out of range), an empty `samples`, or
            a modality / class-name conflict with the folder's existing index. Nothing is renamed into place then.
    """
    if modality not in MODALITY_KEYS:
        raise ShardWriteError(f"unknown modality {modality!r} (known: {', '.join(MODALITY_KEYS)})")
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ShardWriteError(f"split name {split!r}: use letters, digits, '_' and '-'")
    max_bytes = parse_size(max_bytes)
    if max_count < 1 or max_bytes < _TAR_RECORD:
        raise ShardWriteError(f"max_count must be >= 1 and max_bytes >= {_TAR_RECORD} (got {max_count}, {max_bytes})")
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names) if class_names is not None else None
    existing = read_index(out)
    if existing is not None:
        if split in existing.splits and not overwrite:
            raise ShardWriteError(
                f"{out} already has a {split!r} split ({existing.splits[split].num_samples} samples): pass "
                "overwrite=True (--overwrite) to replace it, or write another split or folder"
            )
        if existing.modality != modality:
            raise ShardWriteError(f"{out} holds {existing.modality!r} shards; cannot add a {modality!r} split")
        if names is not None and existing.class_names is not None and existing.class_names != names:
            raise ShardWriteError(
                f"class_names differ from those in {out / 'index.json'}: {names[:5]}... vs "
                f"{existing.class_names[:5]}... (write to another folder or use the same names)"
            )
        if names is None:
            names = existing.class_names
    command = command or _default_command("write_shards", out_dir=str(out), split=split)
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", 0))  # an int: a float mtime costs a PAX header per member

    writer = _SplitWriter(out, split, max_count, max_bytes, mtime)
    seen: set[str] = set()
    extensions: set[str] = set()
    bar = tqdm(total=total, unit="sample", desc=f"write {split}", disable=None if progress else True)
    try:
        for sample in samples:
            key, fields = _encode_sample(sample, modality, None if names is None else len(names), seen)
            extensions.update(fields)
            writer.write(key, fields)
            bar.update(1)
        if not seen:
            raise ShardWriteError(f"no samples to write for split {split!r}")
        with index_lock(out):
            shards = writer.commit()
            index = read_index(out) or DatasetIndex(modality=modality)
            old = index.splits.get(split)
            index.class_names = names if names is not None else index.class_names
            index.command = command
            index.dataset = {**index.dataset, **(dataset or {})}
            index.splits[split] = SplitInfo(
                shards=shards,
                command=command,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                extensions=sorted(extensions),
            )
            write_index(out, index)
    except BaseException:
        writer.abort()
        if created:  # a failed first write leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        bar.close()
    keep = {s.name for s in shards}
    stale = [p for p in out.glob(f"{split}-*.tar") if re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", p.name)]
    for path in stale:
        if path.name not in keep:
            path.unlink()
            logger.info("removed %s (the new %r split has %d shards)", path, split, len(shards))
    if old is not None:
        logger.info("replaced split %r of %s (%d -> %d samples)", split, out, old.num_samples, len(seen))
    return index.to_json()


# ------------------------------------------------------------------------------------- folders and manifests


@dataclass
class _Entry:
    path: Path
    label: int
    caption: str | None = None
    ref: str = ""  # the path as given (relative to the folder / manifest)


def _check_points(data: bytes, where: str) -> tuple[bytes, dict[str, Any]]:
    """A ``.npy`` point cloud ``[P, 3+C]``: float32 stored as is, other float dtypes converted to float32."""
    if not data.startswith(b"\x93NUMPY"):
        raise ShardWriteError(f"{where}: not a .npy file (no NumPy header; save arrays with numpy.save)")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exn:  # numpy raises ValueError, EOFError, OSError ... for a bad file
        raise ShardWriteError(f"{where}: not a readable .npy array ({exn})") from exn
    if not isinstance(arr, np.ndarray):
        raise ShardWriteError(f"{where}: expected one .npy array, got {type(arr).__name__}")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 3:
        raise ShardWriteError(f"{where}: a point cloud must be [P, 3+C] with P >= 1 (xyz first), got {list(arr.shape)}")
    if arr.dtype.kind != "f":
        raise ShardWriteError(f"{where}: a point cloud must hold floats (float32 stored as is), got {arr.dtype}")
    info: dict[str, Any] = {"points": int(arr.shape[0]), "channels": int(arr.shape[1])}
    if arr.dtype != np.float32:
        info["converted_from"] = str(arr.dtype)
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float32)
        data = wds.numpy_dumps(np.ascontiguousarray(arr))
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        what = "NaN" if np.isnan(arr).any() else "inf (or a value too large for float32)"
        raise ShardWriteError(f"{where}: the point cloud holds {what} ({int(bad.sum())} value(s), first in row {row})")
    return data, info


def _check_audio(ext: str, data: bytes, where: str) -> dict[str, Any]:
    """Decode a ``.flac`` / ``.wav`` file fully (in blocks) with soundfile; its sample rate, channels, duration."""
    import soundfile as sf

    formats = {"flac": ("FLAC",), "wav": ("WAV", "WAVEX", "RF64")}[ext]
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.format not in formats:
                raise ShardWriteError(f"{where}: a .{ext} file holds {f.format} audio; give it its own extension")
            frames = 0
            for block in f.blocks(blocksize=1 << 18, dtype="float32"):
                frames += len(block)
            info = {"sample_rate": int(f.samplerate), "channels": int(f.channels), "subtype": str(f.subtype)}
    except ShardWriteError:
        raise
    except Exception as exn:  # soundfile raises LibsndfileError / RuntimeError for a bad file
        reason = re.sub(r"^Error opening <[^>]*>: ", "", str(exn))
        raise ShardWriteError(f"{where}: not readable {ext} audio ({reason})") from exn
    if frames == 0:
        raise ShardWriteError(f"{where}: the audio file holds no samples")
    return {**info, "frames": frames, "duration": round(frames / info["sample_rate"], 6)}


def _check_video(data: bytes, where: str) -> dict[str, Any]:
    """Open an ``.mp4`` with PyAV and decode its first video frame; frames, fps, size, codec, duration."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if "mp4" not in container.format.name.split(","):
                raise ShardWriteError(f"{where}: a .mp4 file holds a {container.format.name!r} container")
            if not container.streams.video:
                raise ShardWriteError(f"{where}: the file has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            info: dict[str, Any] = {
                "frames": int(stream.frames),
                "fps": None if rate is None else round(float(rate), 6),
                "width": int(stream.codec_context.width),
                "height": int(stream.codec_context.height),
                "codec": stream.codec_context.name,
                "duration": None if container.duration is None else round(container.duration / 1_000_000, 6),
            }
            first = next(container.decode(stream), None)
            if first is None:
                raise ShardWriteError(f"{where}: the video stream has no decodable frame")
            if info["frames"] <= 0:  # not in the header: count packets (demux only, no decoding)
                container.seek(0)
                info["frames"] = sum(1 for packet in container.demux(stream) if packet.size)
    except ShardWriteError:
        raise
    except Exception as exn:  # av.error.FFmpegError and friends for a bad file
        raise ShardWriteError(f"{where}: not a decodable mp4 video ({exn})") from exn
    return info


def _check_media(ext: str, data: bytes, where: str) -> tuple[bytes, dict[str, Any]]:
    """Validate a points / audio / video file before it is stored; the bytes to store and facts for its ``json``.

    ``npy``: ``[P, 3+C]`` float32 stored as is, other float dtypes converted to float32 (``converted_from``);
    integer dtypes, other shapes, NaN or inf are refused. ``flac``/``wav``: decoded fully with soundfile (the
    container must match the extension); ``sample_rate``, ``channels``, ``frames``, ``duration`` recorded.
    ``mp4``: opened with PyAV, first frame decoded; ``frames``, ``fps``, ``width``, ``height``, ``codec``,
    ``duration`` recorded. Raises `ShardWriteError` naming the file.
    """
    if ext == "npy":
        return _check_points(data, where)
    if ext in ("flac", "wav"):
        return data, _check_audio(ext, data, where)
    if ext == "mp4":
        return data, _check_video(data, where)
    return data, {}


def _media_key(path: Path, modality: str, reencode: str | None, where: str) -> tuple[str, bool]:
    """The sample key for a file, and whether it must be re-encoded."""
    ext = path.suffix.lower()
    table = FILE_EXTENSIONS[modality]
    if ext in table:
        return table[ext], False
    if modality == "image" and reencode is not None and ext in REENCODABLE:
        return reencode, True
    hint = ""
    if modality == "image" and ext in REENCODABLE:
        hint = f"; pass reencode='png' to convert {ext} files"
    raise ShardWriteError(
        f"{where}: unknown {modality} extension {ext or '(none)'!r} (stored as is: {', '.join(sorted(table))}{hint})"
    )


def _check_reencode(modality: str, reencode: str | None) -> None:
    if reencode is not None and (modality != "image" or reencode not in ("png", "jpg", "webp")):
        raise ShardWriteError(f"reencode must be None or one of png, jpg, webp for images (got {reencode!r})")


def _entry_samples(
    entries: list[_Entry], split: str, modality: str, reencode: str | None, class_names: list[str] | None
) -> Iterator[dict[str, Any]]:
    for i, entry in enumerate(entries):
        media, convert = _media_key(entry.path, modality, reencode, str(entry.path))
        try:
            data = entry.path.read_bytes()
        except FileNotFoundError as exn:
            raise ShardWriteError(f"{entry.path}: file disappeared while writing") from exn
        if convert:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                img.load()
                data = _encode_image(img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGB"), media)
        meta: dict[str, Any] = {"path": entry.ref}
        if class_names is not None:
            meta["class"] = class_names[entry.label]
        if modality != "image":
            data, info = _check_media(media, data, str(entry.path))
            meta.update(info)
        sample = {"__key__": f"{split}-{i:07d}", media: data, LABEL_KEY: entry.label, "json": meta}
        if entry.caption is not None:
            sample["txt"] = entry.caption
        yield sample


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _scan_folder(folder: Path, modality: str, reencode: str | None) -> tuple[list[str], list[tuple[Path, str]]]:
    if not folder.is_dir():
        raise ShardWriteError(f"{folder}: no such folder")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p))
    if not class_dirs:
        loose = [p.name for p in folder.iterdir() if p.is_file() and not _is_hidden(p)]
        detail = f" (it holds {len(loose)} loose files such as {loose[0]!r})" if loose else " (it is empty)"
        raise ShardWriteError(
            f"{folder}: no class sub-folders{detail}; expected the ImageFolder layout {folder}/<class>/<file>"
        )
    files: list[tuple[Path, str]] = []
    for class_dir in class_dirs:
        found = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
        )
        if not found:
            raise ShardWriteError(f"{class_dir}: empty class folder (no {modality} files)")
        for path in found:
            _media_key(path, modality, reencode, str(path))  # unknown extensions fail before anything is written
            files.append((path, class_dir.name))
    return [d.name for d in class_dirs], files


def _resolve_class_names(
    given: Sequence[str] | None, out: Path, found: Sequence[str], where: str
) -> tuple[list[str], dict[str, int]]:
    names = list(given) if given is not None else None
    if names is None:
        existing = read_index(out) if out.is_dir() else None
        names = existing.class_names if existing is not None and existing.class_names is not None else None
    if names is None:
        names = sorted(set(found))
    lookup = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(found) - set(lookup))
    if unknown:
        raise ShardWriteError(f"{where}: classes {unknown[:10]} are not in class_names {names[:10]}...")
    return names, lookup


def _shuffled(entries: list[_Entry], shuffle: bool, seed: int) -> list[_Entry]:
    if shuffle:
        entries = list(entries)
        random.Random(seed).shuffle(entries)
    return entries


def _write_entries(
    entries: list[_Entry],
    out: Path,
    split: str,
    names: Sequence[str],
    *,
    modality: str,
    reencode: str | None,
    max_count: int,
    max_bytes: int | str,
    command: str,
    progress: bool,
    overwrite: bool,
) -> dict[str, Any]:
    """The shared end of the folder and manifest writers: the entries, in order, as shards of `split`."""
    return write_shards(
        _entry_samples(entries, split, modality, reencode, names),
        out,
        split,
        max_count=max_count,
        max_bytes=max_bytes,
        modality=modality,
        class_names=names,
        command=command,
        total=len(entries),
        progress=progress,
        overwrite=overwrite,
    )


def write_from_folder(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    *,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int | str = DEFAULT_MAX_BYTES,
    modality: str = "image",
    class_names: Sequence[str] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    reencode: str | None = None,
    command: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``mmblocks shards write --modality image|points|audio|video --from-folder DIR --out OUT [--split train]
    [--max-count N] [--max-bytes B]``: shards from an ImageFolder tree ``DIR/<class>/<file>`` (files found
    recursively).

    Class names are the sub-folder names, sorted (or `class_names`, or those already in ``OUT/index.json`` so that
    ``val`` gets the label ids of ``train``). Files are stored byte for byte under the key of their extension
    (``.jpeg`` -> ``jpg``), with ``cls`` and ``json`` = ``{"path": "<class>/<file>", "class": name}``; sample keys
    are ``{split}-{i:07d}``. Samples are shuffled with `seed` before writing (so that shards mix classes and a
    reader's shard shuffle + buffer shuffle mixes well); ``shuffle=False`` keeps the sorted order. Hidden files are
    ignored. Other image formats PIL reads (``.bmp``, ``.gif``, ``.tif`` ...) are converted with
    ``reencode="png"|"jpg"|"webp"``.

    Per `modality` the files stored are those of `FILE_EXTENSIONS`: points ``.npy``, audio ``.flac``/``.wav``, video
    ``.mp4``. These are validated and described in ``json`` (`_check_media`): points ``points``, ``channels`` (and
    ``converted_from`` when a float64/float16 cloud was converted to float32); audio ``sample_rate``, ``channels``,
    ``frames``, ``duration``, ``subtype``; video ``frames``, ``fps``, ``width``, ``height``, ``codec``,
    ``duration``.

    Raises:
        ShardWriteError: a missing or empty folder, a class folder without files, an unknown extension, a class
            not in `class_names` (raised before any shard is written); a points / audio / video file that fails
            validation (raised while writing: no shard of the split is renamed into place, the previous version of
            the split is kept).
    """
    _check_reencode(modality, reencode)
    folder, out = Path(folder), Path(out)
    found, files = _scan_folder(folder, modality, reencode)
    names, lookup = _resolve_class_names(class_names, out, found, str(folder))
    entries = [_Entry(path, lookup[cls], None, path.relative_to(folder).as_posix()) for path, cls in files]
    command = command or _default_command("write_from_folder", folder=str(folder), out=str(out), split=split)
    return _write_entries(
        _shuffled(entries, shuffle, seed),
        out,
        split,
        names,
        modality=modality,
        reencode=reencode,
        max_count=max_count,
        max_bytes=max_bytes,
        command=command,
        progress=progress,
        overwrite=overwrite,
    )


def _read_manifest_rows(manifest: Path) -> list[tuple[int, dict[str, Any]]]:
    if not manifest.is_file():
        raise ShardWriteError(f"{manifest}: no such manifest file")
    suffix = manifest.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix in (".jsonl", ".ndjson"):
        with open(manifest, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exn:
                    raise ShardWriteError(f"{manifest}:{line_no}: not valid JSON ({exn.msg})") from exn
                if not isinstance(row, dict):
                    raise ShardWriteError(f"{manifest}:{line_no}: expected a JSON object per line")
                rows.append((line_no, row))
    elif suffix in (".csv", ".tsv"):
        with open(manifest, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise ShardWriteError(f"{manifest}: missing column(s) {missing} (columns: {columns})")
            for line_no, row in enumerate(reader, 2):
                rows.append((line_no, {k.strip(): v for k, v in row.items() if k is not None}))
    else:
        raise ShardWriteError(f"{manifest}: unknown manifest extension {suffix!r} (use .jsonl or .csv)")
    if not rows:
        raise ShardWriteError(f"{manifest}: the manifest has no rows")
    return rows


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value) is not None


def write_from_manifest(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    *,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int | str = DEFAULT_MAX_BYTES,
    modality: str = "image",
    class_names: Sequence[str] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    reencode: str | None = None,
    command: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``mmblocks shards write --modality image|points|audio|video --from-manifest FILE --out OUT [--split ...]``:
    shards from a manifest, ``.jsonl`` (one ``{"path": ..., "label": ..., "caption": ...}`` per line) or ``.csv`` /
    ``.tsv`` with a header naming the columns ``path``, ``label`` and optionally ``caption``.

    Relative paths resolve against the manifest's folder. Labels are either class names or non-negative ints:
    names map through `class_names` (or those in ``OUT/index.json``, or else the sorted set of names); ints are
    used as is, with names ``"0".."K-1"`` when none are known. A caption becomes the sample's ``txt``. Everything
    else is as in `write_from_folder` (byte-for-byte media, shuffled order, ``json`` = ``{"path", "class"}``).

    Raises:
        ShardWriteError: an unknown manifest extension, a missing column/key, an empty manifest, a missing media file
            (with its line number), an unknown media extension, an unknown label name, mixed name/int labels, or
            an int label outside `class_names`; all raised before any shard is written. A points / audio / video
            file that fails validation raises while writing, with nothing of the split renamed into place.
    """
    _check_reencode(modality, reencode)
    manifest, out = Path(manifest), Path(out)
    rows = _read_manifest_rows(manifest)
    base = manifest.parent
    parsed: list[tuple[Path, Any, str | None, str]] = []
    for line_no, row in rows:
        where = f"{manifest}:{line_no}"
        for column in ("path", "label"):
            if row.get(column) in (None, ""):
                raise ShardWriteError(f"{where}: missing {column!r}")
        ref = str(row["path"]).strip()
        path = Path(ref).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise ShardWriteError(f"{where}: file not found: {path}")
        _media_key(path, modality, reencode, where)
        caption = row.get("caption")
        caption = None if caption in (None, "") else str(caption)
        parsed.append((path, row["label"], caption, ref))

    labels = [label for _, label, _, _ in parsed]
    given = list(class_names) if class_names is not None else None
    if given is None and out.is_dir():
        existing = read_index(out)
        given = existing.class_names if existing is not None else None
    name_labels = {str(v).strip() for v in labels if not _is_int_label(v)}
    if given is not None:
        lookup = {name: i for i, name in enumerate(given)}
        names = given
    elif name_labels:
        if len(name_labels) != len(labels) and any(_is_int_label(v) for v in labels):
            raise ShardWriteError(f"{manifest}: labels mix class names and ints; use one kind or pass class_names")
        names = sorted(name_labels)
        lookup = {name: i for i, name in enumerate(names)}
    else:
        names = [str(i) for i in range(max(int(v) for v in labels) + 1)]
        lookup = {}
    entries: list[_Entry] = []
    for (line_no, _), (path, label, caption, ref) in zip(rows, parsed):
        text = str(label).strip()
        if text in lookup:
            index = lookup[text]
        elif _is_int_label(label):
            index = int(label)
            if not 0 <= index < len(names):
                raise ShardWriteError(f"{manifest}:{line_no}: label {index} outside 0..{len(names) - 1}")
        else:
            raise ShardWriteError(f"{manifest}:{line_no}: unknown label {text!r} (class names: {names[:10]}...)")
        entries.append(_Entry(path, index, caption, ref))
    command = command or _default_command("write_from_manifest", manifest=str(manifest), out=str(out), split=split)
    return _write_entries(
        _shuffled(entries, shuffle, seed),
        out,
        split,
        names,
        modality=modality,
        reencode=reencode,
        max_count=max_count,
        max_bytes=max_bytes,
        command=command,
        progress=progress,
        overwrite=overwrite,
    )

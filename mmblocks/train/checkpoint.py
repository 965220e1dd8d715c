"""Atomic, resumable training checkpoints that load safely (safetensors + ``torch.load(weights_only=True)``).

A checkpoint directory holds one folder per saved step and a ``latest`` pointer::

    ckpt_dir/
      latest                  # one line: "step-00001200" (replaced atomically)
      step-00001000/
      step-00001200/
        model.safetensors     # trainable weights only (what the caller passes), CPU, original dtypes
        optimizer.pt          # optimizer.state_dict()  (tensors and primitive containers only)
        scheduler.pt          # scheduler.state_dict()  (idem)
        rng.pt                # python `random`, numpy, torch CPU and CUDA generator states
        state.json            # step, data_state, extra, time, format version, file sizes (written last)

A save writes everything into a hidden ``.tmp-step-…`` folder, fsyncs the files and the folder, renames it to
``step-XXXXXXXX`` with one ``os.replace`` and only then moves the ``latest`` pointer (temp file + ``os.replace``).
A crash at any moment therefore leaves either the previous checkpoint as the latest one or the new one, never a
half-written folder under a ``step-*`` name. Temp and trash folders left by a crash are ignored by
:func:`latest_checkpoint` and removed by the next save. Only one process (rank 0) should save into a directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import MMBlocksError
from ..safe_load import torch_load

__all__ = [
    "CHECKPOINT_FILES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "WeightsMismatchError",
    "capture_rng",
    "checkpoint_info",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_trainable_weights",
    "restore_rng",
    "save_checkpoint",
    "trainable_state_dict",
    "weights_file",
]

FORMAT_NAME = "mmblocks-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
LATEST_FILE = "latest"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, STATE_FILE)

_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class CheckpointError(MMBlocksError, RuntimeError):
    """A checkpoint file is corrupt, truncated, unsafe to unpickle, or from an unknown format."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint folder or one of its files does not exist."""


class WeightsMismatchError(CheckpointError, ValueError):
    """Checkpoint weights that do not fit the model they are loaded into (a missing or unknown name, another shape)."""


# --------------------------------------------------------------------------------------------------------------
# Filesystem helpers
# --------------------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _remove_tree(path: Path) -> None:
    """Delete a folder by first renaming it to a hidden trash name, so no half-deleted ``step-*`` folder exists."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def _is_complete(path: Path) -> bool:
    return path.is_dir() and _step_of(path) is not None and (path / STATE_FILE).is_file()


# --------------------------------------------------------------------------------------------------------------
# Validation of what goes into the .pt and .json files
# --------------------------------------------------------------------------------------------------------------

_PT_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _weights_only_safe(obj: Any, where: str) -> Any:
    """``obj`` with numpy values turned into torch/python ones; raise on anything ``weights_only`` would refuse."""
    if isinstance(obj, Tensor):
        if type(obj) not in (Tensor, torch.nn.Parameter):
            raise TypeError(f"{where}: tensor subclass {type(obj).__name__} cannot be saved weights-only")
        return obj.detach()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if type(obj) in _PT_LEAVES:
        return obj
    if type(obj) is OrderedDict:
        return OrderedDict((k, _weights_only_safe(v, f"{where}[{k!r}]")) for k, v in obj.items())
    if isinstance(obj, dict):  # dict and plain subclasses such as defaultdict become a dict
        return {
            _weights_only_safe(k, f"{where} key {k!r}"): _weights_only_safe(v, f"{where}[{k!r}]")
            for k, v in obj.items()
        }
    if type(obj) is list:
        return [_weights_only_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return tuple(_weights_only_safe(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be saved in a checkpoint that loads with "
        "torch.load(weights_only=True); expected tensors, numbers, strings, None, and dict/list/tuple of them"
    )


def _json_safe(obj: Any, where: str) -> Any:
    """``obj`` as plain JSON (numpy scalars, 0-d tensors, tuples, paths converted; NaN/inf -> None); else raise."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None  # NaN/inf are not JSON; a NaN metric must not fail a save
    if isinstance(obj, np.generic):
        return _json_safe(obj.item(), where)
    if isinstance(obj, Tensor) and obj.numel() == 1 and obj.ndim == 0:
        return _json_safe(obj.item(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: JSON keys must be strings, got {k!r}")
            out[k] = _json_safe(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not JSON-serialisable; data_state and extra "
        "must hold numbers, strings, None, lists and str-keyed dicts"
    )


def _state_dict_of(obj: Any, name: str) -> dict:
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(f"{name} must be an object with .state_dict() or a state dict, got {type(obj).__name__}")


def _prepare_model_state(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, detached tensors; tensors that share storage with another entry are copied."""
    if not isinstance(model_state, Mapping):
        raise TypeError(f"model_state must be a dict[str, Tensor], got {type(model_state).__name__}")
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in model_state.items():
        if not isinstance(key, str):
            raise TypeError(f"model_state keys must be str, got {key!r}")
        if not isinstance(value, Tensor):
            raise TypeError(f"model_state[{key!r}] must be a Tensor, got {type(value).__name__}")
        if value.is_meta:
            raise ValueError(f"model_state[{key!r}] is a meta tensor (no data); materialise the weights first")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        elif t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or not t.is_contiguous():
                t = t.clone(memory_format=torch.contiguous_format)
        t = t.contiguous()
        if t.numel() > 0:
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


# --------------------------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The states of python ``random``, numpy's global RNG, torch CPU and every initialised CUDA device.

    Everything is a tensor, number or string, so the dict can be saved and loaded with ``weights_only=True``.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the generators captured by :func:`capture_rng`; CUDA states are restored per device that exists."""
    _restore_rng(state)


def _restore_rng(state: Mapping[str, Any]) -> None:
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = np.asarray(npy["keys"].cpu().numpy(), dtype=np.uint32)
        np.random.set_state((npy["kind"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda_states = list(state.get("cuda") or [])
    if cuda_states:
        if not torch.cuda.is_available():
            warnings.warn(
                f"checkpoint holds {len(cuda_states)} CUDA RNG state(s) but CUDA is not available; not restored",
                stacklevel=3,
            )
            return
        n = torch.cuda.device_count()
        if n != len(cuda_states):
            warnings.warn(
                f"checkpoint holds {len(cuda_states)} CUDA RNG state(s) but {n} device(s) are visible; "
                f"restoring the first {min(n, len(cuda_states))}",
                stacklevel=3,
            )
        for i, s in enumerate(cuda_states[:n]):
            torch.cuda.set_rng_state(s.cpu(), i)


# --------------------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------------------


def _clean_stale(ckpt_dir: Path) -> None:
    for p in ckpt_dir.iterdir():
        if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The complete ``step-*`` folders in ``ckpt_dir``, oldest step first (temp/trash/incomplete folders skipped)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _is_complete(p)]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def _prune(ckpt_dir: Path, keep: int, latest: Path) -> list[Path]:
    complete = list_checkpoints(ckpt_dir)
    keep_names = {p.name for p in complete[-keep:]} | {latest.name}
    removed = []
    for p in complete:
        if p.name not in keep_names:
            _remove_tree(p)
            removed.append(p)
    if removed:
        _fsync_dir(ckpt_dir)
    return removed


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    *,
    model_state: Mapping[str, Tensor],
    optimizer: Any = None,
    scheduler: Any = None,
    data_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int | None = 3,
) -> Path:
    """Atomically write ``ckpt_dir/step-{step:08d}/`` and point ``ckpt_dir/latest`` at it.

    Args:
        ckpt_dir: the checkpoint directory (created if missing).
        step: the optimizer step reached (the number of updates done), ``>= 0``.
        model_state: name -> tensor of the weights to keep (the trainable ones; frozen LLM blocks are reloaded from
            their source). Any device and dtype; stored on CPU in the same dtype. Tied/shared tensors are stored once
            per name, non-contiguous ones are made contiguous.
        optimizer, scheduler: objects with ``state_dict()`` (or state dicts) to store; ``None`` skips the file.
        data_state: JSON-serialisable data position (e.g. ``{"samples_seen": ..., "epoch": ...}``); numpy scalars,
            0-d tensors, tuples and paths are converted, non-finite floats become ``None``.
        extra: more JSON-serialisable facts (config, metrics, ...), converted the same way.
        keep: how many checkpoints (highest steps) to keep; older ones are deleted. The one just written, which is
            the latest, is never deleted. ``None`` keeps all.

    Returns:
        The path of the new ``step-*`` folder.

    Raises:
        TypeError / ValueError: a state holds something that cannot be stored safely; nothing is written then.
    """
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    step = int(step)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be None or an int >= 1, got {keep!r}")
    ckpt_dir = Path(ckpt_dir)

    # Validate and convert everything before touching the disk.
    tensors = _prepare_model_state(model_state)
    opt_state = None if optimizer is None else _weights_only_safe(_state_dict_of(optimizer, "optimizer"), "optimizer")
    sched_state = None if scheduler is None else _weights_only_safe(_state_dict_of(scheduler, "scheduler"), "scheduler")
    rng_state = capture_rng()
    data_json = _json_safe(dict(data_state or {}), "data_state")
    extra_json = _json_safe(dict(extra or {}), "extra")

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(ckpt_dir)
    name = f"step-{step:08d}"
    final = ckpt_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=ckpt_dir))
    try:
        save_file(tensors, tmp / MODEL_FILE, metadata={"format": "pt", "step": str(step)})
        if opt_state is not None:
            torch.save(opt_state, tmp / OPTIMIZER_FILE)
        if sched_state is not None:
            torch.save(sched_state, tmp / SCHEDULER_FILE)
        torch.save(rng_state, tmp / RNG_FILE)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        now = time.time()
        state = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "step": step,
            "time": now,
            "time_iso": datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "files": files,
            "num_tensors": len(tensors),
            "data_state": data_json,
            "extra": extra_json,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, allow_nan=False) + "\n")
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)

        if final.exists():  # re-saving a step (e.g. after a resume): move the old copy out of the way first
            _remove_tree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _write_bytes_atomic(ckpt_dir / LATEST_FILE, (name + "\n").encode())
    if keep is not None:
        _prune(ckpt_dir, keep, final)
    return final


# --------------------------------------------------------------------------------------------------------------
# Find and load
# --------------------------------------------------------------------------------------------------------------


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``ckpt_dir/latest``; else the highest complete ``step-*`` folder; else ``None``."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    pointer = ckpt_dir / LATEST_FILE
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        candidate = ckpt_dir / name
        if name and "/" not in name and os.sep not in name and _is_complete(candidate):
            return candidate
    complete = list_checkpoints(ckpt_dir)
    return complete[-1] if complete else None


def _resolve(path: Path) -> Path:
    path = _run_or_pointer(path)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    raise CheckpointNotFoundError(
        f"{path / STATE_FILE} is missing: {path} is neither a complete checkpoint folder nor a directory holding one"
    )


def _torch_load(file: Path, map_location: Any) -> Any:
    if not file.is_file():
        raise CheckpointNotFoundError(f"checkpoint file is missing: {file}")
    return torch_load(file, map_location=map_location, mmap=False, error=CheckpointError)


def _read_state(folder: Path) -> dict:
    file = folder / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"checkpoint file is missing: {file}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: not valid JSON ({e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{file} is not an {FORMAT_NAME} state file")
    if int(state.get("version", -1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format version {state.get('version')}; this mmblocks reads up to {FORMAT_VERSION}"
        )
    for name, size in (state.get("files") or {}).items():
        f = folder / name
        if not f.is_file():
            raise CheckpointNotFoundError(f"checkpoint file is missing: {f}")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f} is truncated or modified: {f.stat().st_size} bytes, expected {size}")
    return state


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state.json`` of the checkpoint at `path` (a ``step-*`` folder or a checkpoints folder: its latest),
    checked like `load_checkpoint` checks it (format, version, every file present with its recorded size), with
    ``path`` added; no tensor is read."""
    folder = _resolve(Path(path))
    return {**_read_state(folder), "path": folder}


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, using only safetensors and ``weights_only`` loads.

    Args:
        path: a ``step-*`` folder, or a checkpoint directory (its latest checkpoint is loaded).
        model: if given, the stored weights are copied into it first, and must fit it exactly (as
            `load_trainable_weights` with ``stages=None``), before anything else is loaded.
        optimizer, scheduler: if given, their ``load_state_dict`` receives the stored state (an error if the
            checkpoint has none).
        map_location: device for the model tensors and the optimizer/scheduler tensors.
        restore_rng: set python/numpy/torch/CUDA RNGs to their state at save time.

    Returns:
        ``{"step": int, "model_state": dict[str, Tensor], "data_state": dict, "extra": dict, "path": Path}``.
        To load only the weights of a checkpoint into a model, use `load_trainable_weights`.

    Raises:
        CheckpointNotFoundError: the folder or a file it needs is missing (the message names the file).
        CheckpointError: a file is corrupt, truncated, not weights-only (unsafe pickle), or of a newer format.
    """
    folder = _resolve(Path(path))
    state = _read_state(folder)
    device = str(map_location) if map_location is not None else "cpu"

    model_file = folder / MODEL_FILE
    if not model_file.is_file():
        raise CheckpointNotFoundError(f"checkpoint file is missing: {model_file}")
    try:
        model_state = load_file(model_file, device=device)
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {model_file}: corrupt safetensors file ({e})") from e
    if model is not None:
        _assign_weights(model, model_state, None, model_file)

    for obj, file in ((optimizer, OPTIMIZER_FILE), (scheduler, SCHEDULER_FILE)):
        if obj is None:
            continue
        loaded = _torch_load(folder / file, map_location)
        try:
            obj.load_state_dict(loaded)
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(
                f"{folder / file} does not match the {type(obj).__name__} it is loaded into "
                f"(different parameter groups or class?): {e}"
            ) from e
    if restore_rng:
        rng_file = folder / RNG_FILE
        if rng_file.is_file():
            _restore_rng(_torch_load(rng_file, "cpu"))
        else:
            warnings.warn(f"{rng_file} is missing; RNG states not restored", stacklevel=2)

    return {
        "step": int(state["step"]),
        "model_state": model_state,
        "data_state": state.get("data_state") or {},
        "extra": state.get("extra") or {},
        "path": folder,
    }


# --------------------------------------------------------------------------------------------------------------
# Model weights
# --------------------------------------------------------------------------------------------------------------


def _persistent_buffers(model: nn.Module) -> dict[str, Tensor]:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in params}


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What training changes, by name: the trainable parameters and the persistent buffers (BatchNorm running
    statistics of a point tokenizer, a soft mask's ratio, ...). Frozen LLM weights are rebuilt from their source,
    never saved."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach() for n, b in _persistent_buffers(model).items()})
    return state


def _run_or_pointer(path: Path) -> Path:
    """A run folder -> its ``checkpoints`` folder; a ``latest`` pointer file -> the checkpoints folder holding it."""
    if path.is_file() and path.name == LATEST_FILE:
        return path.parent
    if path.is_dir() and not (path / STATE_FILE).is_file() and (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


def weights_file(path: str | os.PathLike) -> Path:
    """The ``model.safetensors`` of a checkpoint: `path` itself (a file), a folder holding one (a ``step-*``
    folder), or the latest checkpoint of a checkpoints folder, of a run folder or of a ``latest`` pointer."""
    path = _run_or_pointer(Path(path).expanduser())
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    folder = latest_checkpoint(path) if path.is_dir() else None
    if folder is None:
        what = "holds no complete checkpoint" if path.is_dir() else "does not exist"
        raise CheckpointNotFoundError(f"checkpoint weights not found: {path} {what}")
    return folder / MODEL_FILE


def load_trainable_weights(model: nn.Module, path: str | os.PathLike, stages: Sequence[str] | None = None) -> list[str]:
    """Copy the weights of an mmblocks checkpoint (`weights_file`: a ``step-*`` folder, a checkpoints folder or a
    ``model.safetensors``) into `model`; returns the names loaded. The one place checkpoint weights are loaded.

    Args:
        stages: None (resume, evaluation): the checkpoint and the model must agree exactly on what training
            changes: every tensor stored must exist in the model with the same shape, and every trainable parameter
            and persistent buffer of the model must be stored. Names of top-level submodules (e.g. ``tokenizer``,
            ``backbone``): only the tensors under them are read (a trained tower under a new head), each stage must
            get at least one, and shapes must agree.

    Raises:
        CheckpointNotFoundError: no weights at `path`.
        CheckpointError: a corrupt file.
        WeightsMismatchError: the weights do not fit the model (the message names a tensor and both shapes).
    """
    file = weights_file(path)
    try:
        stored = load_file(str(file))
    except SafetensorError as e:
        raise CheckpointError(f"cannot read {file}: corrupt safetensors file ({e})") from e
    return _assign_weights(model, stored, stages, file)


def _assign_weights(
    model: nn.Module, stored: Mapping[str, Tensor], stages: Sequence[str] | None, file: Path
) -> list[str]:
    """Copy `stored` into `model` after checking that it fits (see `load_trainable_weights`); names copied."""
    own = {**dict(model.named_parameters()), **_persistent_buffers(model)}
    if stages is None:
        names = list(stored)
        unknown = [n for n in names if n not in own]
        if unknown:
            raise WeightsMismatchError(
                f"{file} has weights for {unknown[0]!r} (and {len(unknown) - 1} more), which this model does not "
                "have: build the model with the configuration that trained the checkpoint"
            )
        missing = sorted(set(trainable_state_dict(model)) - set(stored))
        if missing:
            raise WeightsMismatchError(f"{file} lacks trainable weights of this model, e.g. {missing[:3]}")
    else:
        prefixes = tuple(f"{s}." for s in stages)
        names = [n for n in stored if n.startswith(prefixes) and n in own]
    for name in names:
        if own[name].shape != stored[name].shape:
            raise WeightsMismatchError(
                f"{file}: {name} has shape {tuple(stored[name].shape)}, the model {tuple(own[name].shape)} (build the "
                "model with the configuration that trained the checkpoint)"
            )
    with torch.no_grad():
        for name in names:
            own[name].copy_(stored[name].to(own[name].device))
    for stage in stages or ():
        prefix = f"{stage}."
        if not any(n.startswith(prefix) for n in names) and any(n.startswith(prefix) for n in own):
            raise WeightsMismatchError(f"{file} holds no weights for stage {stage!r} of this model")
    return names

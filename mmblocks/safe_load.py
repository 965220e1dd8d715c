"""`torch_load`: how the package reads every pickle-based ``.pt`` / ``.bin`` file: weights only, path in every error.

``torch.load(weights_only=True)`` runs no code from the file: a pickle that asks for anything but tensors and
primitive containers is refused. Zip-format files (``torch.save``'s default since 1.6) are memory-mapped, so tensors
are paged in only when read; legacy (non-zip) files, which cannot be mapped, are read whole instead of failing.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["torch_load"]


def _refusal_detail(message: str) -> str:
    """The line of torch's weights-only refusal that says what the file asked for (``Trying to load unsupported
    GLOBAL posix.system ...``), without its advice to retry with ``weights_only=False``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "not an allowed global" in line]
    return (useful or ["unreadable as a weights-only pickle"])[0]


def torch_load(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    mmap: bool = True,
    error: type[Exception] = ValueError,
) -> Any:
    """``torch.load(path, weights_only=True)``, memory-mapped when the file is in the zip format and `mmap`.

    Raises:
        FileNotFoundError: no file at `path`.
        error: (the caller's error class) the file is not weights-only (a pickle that would run code or build
            objects), or it is not a torch file at all, or it is truncated; the message names the file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        raise error(
            f"refusing to load {path}: not a weights-only file (it holds objects other than tensors and primitive "
            f"containers, which could run code, or it is not a torch file): {_refusal_detail(str(e))}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise error(f"cannot read {path}: corrupt, truncated or not a torch file ({type(e).__name__}: {e})") from e

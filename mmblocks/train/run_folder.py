"""A run folder holds one run: a new run never writes into another's, and ``--resume`` always has something to resume.

``train.out_dir`` collects everything a run writes (checkpoints, ``metrics.jsonl``, ``summary.json``, the report,
TensorBoard events, ``config.yaml``). Training into a folder that already holds a run would overwrite its summary and
report, append a second run to its metrics and mix its checkpoints with the new ones, so it is refused unless the user
says which they mean: ``resume`` (continue it) or ``overwrite`` (move it aside, to ``<out_dir>.old-<time>``, and start
afresh; nothing is deleted).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import MMBlocksError
from .checkpoint import latest_checkpoint, list_checkpoints
from .logging import METRICS_FILE, TENSORBOARD_DIR
from .report import REPORT_DIR

__all__ = ["RUN_FILES", "RunFolderError", "prepare_run_folder", "run_contents"]

CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"
#: What a run writes into its folder; any of them present means the folder holds a run.
RUN_FILES = (CHECKPOINT_DIR, METRICS_FILE, SUMMARY_FILE, REPORT_DIR, TENSORBOARD_DIR, "config.yaml")


class RunFolderError(MMBlocksError, FileExistsError):
    """A new run into a folder that holds one, or ``resume`` with nothing to resume."""


def run_contents(out_dir: str | os.PathLike) -> list[str]:
    """The entries of `RUN_FILES` in `out_dir`, described (``checkpoints (step-00000040 latest)``); empty: no run."""
    out_dir = Path(out_dir)
    found = []
    for name in RUN_FILES:
        path = out_dir / name
        if not path.exists():
            continue
        if name == CHECKPOINT_DIR:
            steps = list_checkpoints(path)
            found.append(f"{name} ({steps[-1].name} latest)" if steps else f"{name} (none complete)")
        else:
            found.append(name)
    return found


def _aside(out_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out_dir.with_name(f"{out_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{n}")
    return target


def prepare_run_folder(
    out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, is_main: bool = True
) -> Path | None:
    """Check that `out_dir` can take this run; with `overwrite`, move a previous run aside (on the main rank only).

    Returns the checkpoint to resume from (`resume`), else None.

    Raises:
        RunFolderError: `out_dir` holds a run and neither `resume` nor `overwrite` is set; or `resume` is set and
            ``out_dir/checkpoints`` holds no complete checkpoint.
        ValueError: both `resume` and `overwrite`.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in out_dir, or move it aside")
    out_dir = Path(out_dir)
    if resume:
        latest = latest_checkpoint(out_dir / CHECKPOINT_DIR)
        if latest is None:
            held = run_contents(out_dir)
            what = (
                f"it holds {', '.join(held)}"
                if held
                else "it holds no run"
                if out_dir.exists()
                else "it does not exist"
            )
            raise RunFolderError(
                f"--resume: {out_dir} has no checkpoint to resume from ({what}); start a new run without --resume"
                + (" and with --overwrite" if held else "")
            )
        return latest
    held = run_contents(out_dir)
    if not held:
        return None
    if not overwrite:
        raise RunFolderError(
            f"{out_dir} already holds a run ({', '.join(held)}): continue it with --resume, start over with "
            f"--overwrite (the old run is moved to {out_dir.name}.old-<time>, nothing is deleted), or set "
            "train.out_dir to another folder"
        )
    if is_main:
        target = _aside(out_dir)
        os.replace(out_dir, target)
        print(f"moved the previous run in {out_dir} to {target}")
    return None

"""The training library: `Trainer(model, task, loaders, ...)`, its settings and callbacks, checkpoints, metrics,
schedules, reports and process groups. It never reads a config (that is `mmblocks.recipes`)."""

from .callbacks import CalibrationCallback, Callback, FunctionCallback, SoftMaskCallback, default_callbacks
from .checkpoint import (
    checkpoint_info,
    latest_checkpoint,
    load_checkpoint,
    load_trainable_weights,
    save_checkpoint,
    trainable_state_dict,
)
from .distributed import DistInfo, init_distributed
from .fsdp import apply_fsdp, fsdp_units, fsdp_unsharded
from .instrument import StageStats, token_stats
from .ledger import DataLedger
from .logging import MetricsLogger, StepTimer, read_metrics
from .report import compare_runs_table, write_report
from .run_folder import RunFolderError, prepare_run_folder, run_contents
from .schedule import build_scheduler, param_groups
from .settings import TrainSettings
from .trainer import ResumeMismatchError, Trainer, evaluate, seed_everything

__all__ = [
    "CalibrationCallback",
    "Callback",
    "DataLedger",
    "DistInfo",
    "FunctionCallback",
    "MetricsLogger",
    "ResumeMismatchError",
    "RunFolderError",
    "SoftMaskCallback",
    "StageStats",
    "StepTimer",
    "TrainSettings",
    "Trainer",
    "apply_fsdp",
    "build_scheduler",
    "checkpoint_info",
    "compare_runs_table",
    "default_callbacks",
    "evaluate",
    "fsdp_units",
    "fsdp_unsharded",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "load_trainable_weights",
    "param_groups",
    "prepare_run_folder",
    "read_metrics",
    "run_contents",
    "save_checkpoint",
    "seed_everything",
    "token_stats",
    "trainable_state_dict",
    "write_report",
]

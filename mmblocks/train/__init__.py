"""The training library: `Trainer(model, task, loaders, ...)`, its settings and callbacks, checkpoints, metrics,
schedules, reports and process groups. It never reads a config (that is `mmblocks.recipes`)."""

from .callbacks import Callback, FunctionCallback, SoftMaskCallback, default_callbacks
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_trainable_weights,
    save_checkpoint,
    trainable_state_dict,
)
from .distributed import DistInfo, init_distributed
from .logging import MetricsLogger, StepTimer, read_metrics
from .report import compare_runs_table, write_report
from .schedule import build_scheduler, param_groups
from .settings import TrainSettings
from .trainer import Trainer, evaluate, seed_everything

__all__ = [
    "Callback",
    "DistInfo",
    "FunctionCallback",
    "MetricsLogger",
    "SoftMaskCallback",
    "StepTimer",
    "TrainSettings",
    "Trainer",
    "build_scheduler",
    "compare_runs_table",
    "default_callbacks",
    "evaluate",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "load_trainable_weights",
    "param_groups",
    "read_metrics",
    "save_checkpoint",
    "seed_everything",
    "trainable_state_dict",
    "write_report",
]

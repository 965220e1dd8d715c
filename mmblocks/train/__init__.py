"""Training: the `Trainer`, checkpoints, metrics, schedules, reports and process groups."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .logging import MetricsLogger, StepTimer, read_metrics
from .report import compare_runs_table, write_report
from .schedule import build_scheduler, param_groups
from .trainer import Trainer, evaluate_checkpoint, train, trainable_state_dict

__all__ = [
    "MetricsLogger",
    "StepTimer",
    "Trainer",
    "build_scheduler",
    "compare_runs_table",
    "evaluate_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "param_groups",
    "read_metrics",
    "save_checkpoint",
    "train",
    "trainable_state_dict",
    "write_report",
]

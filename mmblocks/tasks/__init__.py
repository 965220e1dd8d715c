"""Tasks: what is learned from a batch (the fields it needs, its head, loss and metrics), registered by name."""

from .base import Metrics, StepOutput, Task
from .classification import ClassificationMetrics, ClassificationTask
from .contrastive import ContrastiveMetrics, ContrastiveTask, unwrap_model
from .ctc import CTCMetrics, CTCTask
from .prefix_lm import PREFIX_LM_METRICS, PrefixLMMetrics, PrefixLMTask, prefix_lm_head, take_tokens
from .reconstruction import ReconstructionMetrics, ReconstructionTask
from .registry import TASKS, create_task, list_tasks, register_task
from .text_to_image import DIGIT_WORDS, TextToImageMetrics, TextToImageTask, code_lm_head, digits_judge

__all__ = [
    "DIGIT_WORDS",
    "TASKS",
    "TextToImageMetrics",
    "TextToImageTask",
    "code_lm_head",
    "digits_judge",
    "ClassificationMetrics",
    "ClassificationTask",
    "ContrastiveMetrics",
    "ContrastiveTask",
    "CTCMetrics",
    "CTCTask",
    "Metrics",
    "PREFIX_LM_METRICS",
    "PrefixLMMetrics",
    "PrefixLMTask",
    "ReconstructionMetrics",
    "ReconstructionTask",
    "StepOutput",
    "Task",
    "create_task",
    "list_tasks",
    "prefix_lm_head",
    "register_task",
    "take_tokens",
    "unwrap_model",
]

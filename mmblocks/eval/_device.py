"""Device helpers shared by the zero-shot evaluators."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


def autocast_if(device: torch.device, amp: bool) -> AbstractContextManager:
    """``torch.autocast`` on `device` when `amp`, else nothing."""
    return torch.autocast(device.type) if amp else nullcontext()


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor moved to `device`; anything else as it is."""
    return value.to(device) if isinstance(value, torch.Tensor) else value

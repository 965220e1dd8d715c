"""Name -> task registry: ``task: {name: classification, ...}`` in a config names a class here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers_mm.registry import Registry

from .base import Task

__all__ = ["TASKS", "create_task", "list_tasks", "register_task"]

TASKS: Registry[Task] = Registry("task")


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: make a `Task` subclass available to `create_task(name, **options)`."""

    def wrap(cls: type) -> type:
        cls.name = name
        return TASKS.register(name)(cls)

    return wrap


def list_tasks() -> list[str]:
    """Registered task names."""
    return TASKS.names()


def create_task(name: str, **kwargs: Any) -> Task:
    """Build the task `name` with its options."""
    return TASKS.create(name, **kwargs)

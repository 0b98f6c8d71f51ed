"""Task registry: name -> Task."""

from __future__ import annotations

from rdrop_lab.tasks.base import DataError, Example, Task, TaskData, default_data_dir
from rdrop_lab.tasks.glue import GLUE_TASKS
from rdrop_lab.tasks.images import IMAGE_TASKS
from rdrop_lab.tasks.language_model import LM_TASKS
from rdrop_lab.tasks.translation import TRANSLATION_TASKS

__all__ = ["TASKS", "DataError", "Example", "Task", "TaskData", "default_data_dir", "get_task"]

TASKS: dict[str, Task] = {**GLUE_TASKS, **TRANSLATION_TASKS, **LM_TASKS, **IMAGE_TASKS}


def get_task(name: str) -> Task:
    """The registered task called ``name`` (a clear error listing the known ones otherwise)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None

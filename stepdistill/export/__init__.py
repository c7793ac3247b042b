"""Export a distilled student as a diffusers folder (``stepdistill export``); ``loaders.load_exported``
reads one back.

The names below load on first use (PEP 562), so ``export.scheduler``, which training reads to check a
student's sampler, is imported without the writer's diffusers pipelines and the card's metrics."""
from importlib import import_module

_WHERE = {"export_run": "writer", "export_student": "writer",
          "student_scheduler_config": "scheduler", "student_timesteps": "scheduler"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

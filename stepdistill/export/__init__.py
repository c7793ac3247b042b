"""Export a distilled student as a diffusers folder (``stepdistill export``); ``loaders.load_exported``
reads one back."""
from .scheduler import student_scheduler_config, student_timesteps
from .writer import export_run, export_student

__all__ = ["export_run", "export_student", "student_scheduler_config", "student_timesteps"]

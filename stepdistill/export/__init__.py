"""Export a distilled student as a diffusers folder (``stepdistill export``) and load it back."""
from .load import is_export_dir, load_exported, load_exported_model
from .scheduler import student_scheduler_config, student_timesteps
from .writer import EXPORT_META, export_run, export_student

__all__ = ["export_run", "export_student", "student_scheduler_config", "student_timesteps", "load_exported",
           "load_exported_model", "is_export_dir", "EXPORT_META"]

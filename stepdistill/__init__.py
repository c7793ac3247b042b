"""stepdistill: distil a slow, many-step diffusion or flow model into a 1-4 step generator."""

__version__ = "0.1.0"

"""One trainer for every objective: phases and update ratios, mixed precision, gradient
accumulation and checkpointing, EMA, atomic checkpoints and exact resume, NaN/Inf guards, logs,
progress bars and preview grids (``Trainer``); run folders back into a sampling student
(``load_run``)."""
from .config import EMAConfig, OptimConfig, TrainConfig
from ..loaders import load_run

__all__ = ["TrainConfig", "OptimConfig", "EMAConfig", "load_run", "train", "resolve"]


def resolve(path=None, overrides=()):
    from .setup import resolve as _resolve

    return _resolve(path, overrides)


def train(path=None, overrides=()) -> dict:
    """Resolve a config and train (resuming from the run folder's newest checkpoint)."""
    from .trainer import Trainer

    cfg, objective = resolve(path, overrides)
    return Trainer(cfg, objective).train()

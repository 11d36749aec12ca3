"""The training engine: a loop built from small named parts, shared by every training stage.

A stage supplies a ``Task`` (its model, its batches and its loss dict); the engine owns what is
the same for all of them: precision (``precision``), parameter groups, optimizer and schedule
(``optim``), accumulation, clipping and the NaN stop (``loop``), atomic checkpoints with exact
resume (``checkpoint``), early stopping (``early_stop``) and the loggers (``loggers``). Settings
come in as an ``EngineConfig`` (``config``), whose every default is declared once, in
conf/train/default.yaml.
"""

from distill.engine.config import EngineConfig
from distill.engine.loop import Task, TrainingDiverged, fit

__all__ = ["EngineConfig", "Task", "TrainingDiverged", "fit"]

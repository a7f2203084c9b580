"""Pre-training: data pipeline, schedule, trainer (single process or DDP)."""

from calofm.training.trainer import TrainConfig, evaluate, train

__all__ = ["TrainConfig", "evaluate", "train"]

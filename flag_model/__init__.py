"""FLAG-TRADER Explorer: open a FLAG-TRADER checkpoint, rebuild the model faithfully, look inside it."""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .config import ConfigError, ModelConfig, infer_config
from .model import FlagTrader, ModelMismatchError, build_model

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "FlagTrader",
    "ModelConfig",
    "ModelMismatchError",
    "build_model",
    "infer_config",
    "load_checkpoint",
]

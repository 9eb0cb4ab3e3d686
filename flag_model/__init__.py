"""FLAG-TRADER Explorer: open a FLAG-TRADER checkpoint, rebuild the model faithfully, look inside it."""

import os

# OpenMP worker threads that spin while they wait burn CPU that another session (or the dashboard's background demo
# build) needs: on 2 shared cores, spinning turned the demo's 36 s of CPU time into 118 s. Sleeping waiters cost
# little on an idle machine. Only a default (an explicit setting wins), and only effective before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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

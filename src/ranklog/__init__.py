"""ranklog: per-rank ZeroMQ logging handler and a sidecar collector for training metrics.

On each rank::

    from ranklog import setup_metric_logger
    setup_metric_logger("async,tensorboard", output_dir="logs")
    logging.getLogger("instructlab.training.metrics").info({"loss": 0.5}, extra={"step": 1})
"""

from ranklog._collector import Collector
from ranklog._errors import ConfigError, ProtocolError, RanklogError
from ranklog._filters import FormatDictFilter, IsMappingFilter, IsRank0Filter
from ranklog._handler import ZMQSocketHandler
from ranklog._jsonl import AsyncStructuredHandler
from ranklog._mlflow import MLflowHandler
from ranklog._setup import (
    finish_metric_logger,
    propagate_package_logs,
    setup_metric_logger,
    setup_root_logger,
)
from ranklog._tensorboard import TensorBoardHandler
from ranklog._wandb import WandbHandler

__all__ = [
    "AsyncStructuredHandler",
    "Collector",
    "ConfigError",
    "FormatDictFilter",
    "IsMappingFilter",
    "IsRank0Filter",
    "MLflowHandler",
    "ProtocolError",
    "RanklogError",
    "TensorBoardHandler",
    "WandbHandler",
    "ZMQSocketHandler",
    "finish_metric_logger",
    "propagate_package_logs",
    "setup_metric_logger",
    "setup_root_logger",
]

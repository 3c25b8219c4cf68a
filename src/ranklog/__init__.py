"""ranklog: per-rank ZeroMQ logging handler and a sidecar collector for training metrics.

On each rank::

    from ranklog import setup_metric_logger
    setup_metric_logger("async,tensorboard", output_dir="logs")
    logging.getLogger("instructlab.training.metrics").info({"loss": 0.5}, extra={"step": 1})

Importing ``ranklog`` loads the rank side only (``ranklog.rank`` and the shared formats);
``Collector`` and the backend handlers load when first named (see docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ranklog.errors import ConfigError, ProtocolError, RanklogError
from ranklog.filters import FormatDictFilter, IsMappingFilter, IsRank0Filter
from ranklog.rank.handler import ZMQSocketHandler
from ranklog.rank.setup import (
    finish_metric_logger,
    propagate_package_logs,
    setup_metric_logger,
    setup_root_logger,
)

if TYPE_CHECKING:
    from ranklog.backends.jsonl import AsyncStructuredHandler
    from ranklog.backends.mlflow import MLflowHandler
    from ranklog.backends.tensorboard import TensorBoardHandler
    from ranklog.backends.wandb import WandbHandler
    from ranklog.collector.collector import Collector

# Collector-side names, imported on first use so that a training rank never loads them.
_LAZY = {
    "AsyncStructuredHandler": "ranklog.backends.jsonl",
    "Collector": "ranklog.collector.collector",
    "MLflowHandler": "ranklog.backends.mlflow",
    "TensorBoardHandler": "ranklog.backends.tensorboard",
    "WandbHandler": "ranklog.backends.wandb",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ranklog' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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

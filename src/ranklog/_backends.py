"""The collector's logger tree: InstructLab's handler set, or a user's dictConfig file."""

from __future__ import annotations

import json
import logging
import logging.config
from pathlib import Path
from typing import Any

from ranklog._errors import ConfigError
from ranklog._fanout import QueuedHandler

# logger type -> (handler factory path, filters). TensorBoard and W&B see rank 0 only, as in
# InstructLab; JSONL keeps one file per rank.
BACKENDS: dict[str, tuple[str, list[str]]] = {
    "async": ("ranklog.AsyncStructuredHandler", ["is_mapping"]),
}


def parse_logger_types(loggers: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"async, tensorboard"`` or a list -> validated list of backend names."""
    names = loggers.split(",") if isinstance(loggers, str) else list(loggers)
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise ConfigError(
            f"unknown logger type(s) {', '.join(unknown)}; expected some of {', '.join(BACKENDS)}"
        )
    return names


def metric_logging_config(
    loggers: list[str], run_name: str | None, output_dir: str | Path
) -> dict[str, Any]:
    """A dictConfig putting the chosen backends on the collector's root logger."""
    from ranklog._filters import IsMappingFilter, IsRank0Filter

    handlers: dict[str, Any] = {}
    for name in loggers:
        factory, filters = BACKENDS[name]
        handlers[name] = {
            "()": factory,
            "log_dir": str(output_dir),
            "filters": filters,
        }
        if name != "async":  # JSONL keeps InstructLab's per-rank file names
            handlers[name]["run_name"] = run_name
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "is_mapping": {"()": IsMappingFilter},
            "is_rank0": {"()": IsRank0Filter},
        },
        "handlers": handlers,
        "root": {"handlers": list(handlers), "level": "NOTSET"},
    }


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a dictConfig from YAML or JSON."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ConfigError(f"{path}: expected a logging dictConfig mapping with version: 1")
    return data


def install_backends(config: dict[str, Any]) -> list[QueuedHandler]:
    """Apply ``config`` and move every handler it attached behind its own queue."""
    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ConfigError(f"logging configuration failed: {exc}") from exc
    wrapped: dict[int, QueuedHandler] = {}
    loggers = [logging.getLogger()] + [
        item for item in logging.Logger.manager.loggerDict.values()
        if isinstance(item, logging.Logger)
    ]
    for logger in loggers:
        if logger.name.startswith("ranklog"):
            continue
        for index, handler in enumerate(logger.handlers):
            if isinstance(handler, QueuedHandler):
                continue
            queued = wrapped.get(id(handler))
            if queued is None:
                queued = wrapped[id(handler)] = QueuedHandler(handler)
                queued.setLevel(handler.level)
            logger.handlers[index] = queued
    return list(wrapped.values())

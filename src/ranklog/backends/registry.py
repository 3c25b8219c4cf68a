"""The collector's logger tree: InstructLab's handler set, or a user's dictConfig file."""

from __future__ import annotations

import functools
import json
import logging
import logging.config
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ranklog.backends.policies import RankPolicy, make_policy, unknown_backends
from ranklog.backends.runner import JournalBackend
from ranklog.errors import ConfigError
from ranklog.names import BACKEND_NAMES, DEFAULT_POLICY_TIMEOUT

# logger type -> (handler factory path, filters). Which ranks reach a backend is its rank
# policy (``_policy.py``), not a filter: TensorBoard, W&B and MLflow default to rank 0, as in
# InstructLab; JSONL keeps one file per rank.
BACKENDS: dict[str, tuple[str, list[str]]] = {
    "async": ("ranklog.AsyncStructuredHandler", ["is_mapping"]),
    "tensorboard": ("ranklog.TensorBoardHandler", ["is_mapping"]),
    "wandb": ("ranklog.WandbHandler", ["is_mapping"]),
    "mlflow": ("ranklog.MLflowHandler", ["is_mapping"]),
}
assert tuple(BACKENDS) == BACKEND_NAMES, "ranklog.names must list exactly these backends"


def metric_logging_config(
    loggers: list[str], run_name: str | None, output_dir: str | Path
) -> dict[str, Any]:
    """A dictConfig putting the chosen backends on the collector's root logger."""
    from ranklog.filters import IsMappingFilter, IsRank0Filter

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


def _policy_for(
    handler: logging.Handler,
    policies: Mapping[str, str],
    world_size: int | None,
    policy_timeout: float,
) -> Callable[[], RankPolicy] | None:
    """What makes the handler's rank policy (a fresh one each call), if it has one."""
    name = handler.get_name() or type(handler).__name__
    # --policy first, then a config file's choice (its "." key sets ``rank_policy`` on the
    # handler), then the class default (TensorBoard, W&B: rank0). Other handlers, like a
    # stdlib one from a --config file, see every record unless a policy names them.
    spec = (
        policies.get(name)
        or getattr(handler, "rank_policy", None)
        or getattr(handler, "default_rank_policy", None)
    )
    if spec is None:
        return None
    from ranklog.backends.jsonl import AsyncStructuredHandler

    return functools.partial(
        make_policy,
        spec,
        name,
        rename=not isinstance(handler, AsyncStructuredHandler),  # it writes a file per rank
        timeout=policy_timeout,
        world_size=world_size,
    )


def install_backends(
    config: dict[str, Any],
    policies: Mapping[str, str] | None = None,
    *,
    world_size: int | None = None,
    policy_timeout: float = DEFAULT_POLICY_TIMEOUT,
) -> list[JournalBackend]:
    """Apply ``config`` and put every handler it attached on a thread of its own.

    ``policies`` maps handler names (``tensorboard``, or a key of the config's
    ``handlers``) to a rank policy that runs in front of that handler. A config file can
    choose one too, with dictConfig's attribute key: ``".": {"rank_policy": "mean"}``.
    The backends start once :meth:`JournalBackend.attach_journal` says where to read.
    """
    policies = dict(policies or {})
    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ConfigError(f"logging configuration failed: {exc}") from exc
    wrapped: dict[int, JournalBackend] = {}
    loggers = [logging.getLogger()] + [
        item
        for item in logging.Logger.manager.loggerDict.values()
        if isinstance(item, logging.Logger)
    ]
    for logger in loggers:
        if logger.name.startswith("ranklog"):
            # A config without `disable_existing_loggers: false` must not silence the
            # collector's own status and error lines.
            logger.disabled = False
            continue
        for index, handler in enumerate(logger.handlers):
            if isinstance(handler, JournalBackend):
                continue
            backend = wrapped.get(id(handler))
            if backend is None:
                policy = _policy_for(handler, policies, world_size, policy_timeout)
                backend = wrapped[id(handler)] = JournalBackend(handler, policy=policy)
                backend.setLevel(handler.level)
            logger.handlers[index] = backend
    names = [str(backend.name) for backend in wrapped.values()]
    missing = unknown_backends(policies, names)
    if missing:
        for backend in wrapped.values():
            backend.inner.close()
        raise ConfigError(
            f"--policy names backend(s) {', '.join(missing)} that the configuration does not "
            f"have; configured: {', '.join(names) or 'none'}"
        )
    return list(wrapped.values())

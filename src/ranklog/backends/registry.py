"""The collector's logger tree: InstructLab's handler set, or a user's dictConfig file."""

from __future__ import annotations

import functools
import json
import logging
import logging.config
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ranklog.backends.feed import Feed
from ranklog.backends.jsonl import AsyncStructuredHandler
from ranklog.backends.mlflow import MLflowHandler
from ranklog.backends.policies import RankPolicy, make_policy, unknown_backends
from ranklog.backends.protocol import DeclaresRanks
from ranklog.backends.route import detach_handlers
from ranklog.backends.runner import Runner
from ranklog.backends.sink import Sink
from ranklog.backends.tensorboard import TensorBoardHandler
from ranklog.backends.wandb import WandbHandler
from ranklog.errors import ConfigError
from ranklog.names import BACKEND_NAMES, DEFAULT_POLICY_TIMEOUT

# logger type -> handler class. Which ranks reach a backend is its rank policy
# (``policies.py``), which each class declares (``protocol.DeclaresRanks``): TensorBoard, W&B
# and MLflow default to rank 0, as in InstructLab; JSONL keeps one file per rank.
BACKENDS: dict[str, type[DeclaresRanks]] = {
    "async": AsyncStructuredHandler,
    "tensorboard": TensorBoardHandler,
    "wandb": WandbHandler,
    "mlflow": MLflowHandler,
}
assert tuple(BACKENDS) == BACKEND_NAMES, "ranklog.names must list exactly these backends"


def metric_logging_config(
    loggers: list[str],
    run_name: str | None,
    output_dir: str | Path,
    options: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """A dictConfig putting the chosen backends on the collector's root logger; ``options``
    adds arguments per backend (``{"wandb": {"project": "p"}}``), overriding the defaults."""
    from ranklog.filters import IsMappingFilter

    handlers: dict[str, Any] = {}
    for name in loggers:
        factory = BACKENDS[name]
        handlers[name] = {"()": factory, "log_dir": str(output_dir), "filters": ["is_mapping"]}
        if not factory.keeps_ranks_apart:  # JSONL keeps InstructLab's per-rank file names
            handlers[name]["run_name"] = run_name
        handlers[name].update((options or {}).get(name, {}))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"is_mapping": {"()": IsMappingFilter}},
        "handlers": handlers,
        "root": {"handlers": list(handlers), "level": "NOTSET"},
    }


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a dictConfig from YAML or JSON; a file that cannot be read or parsed is a
    :class:`ConfigError` naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json's ValueError, yaml's YAMLError: one line either way
        kind = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
        raise ConfigError(f"{path} is not valid {kind}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or data.get("version") != 1:
        raise ConfigError(f"{path}: expected a logging dictConfig mapping with version: 1")
    return data


def _configured_policies(config: Mapping[str, Any]) -> dict[str, str]:
    """Rank policies a config file chose with dictConfig's attribute key:
    ``handlers: {NAME: {".": {"rank_policy": "mean"}}}``."""
    chosen = {}
    for name, handler in (config.get("handlers") or {}).items():
        attributes = handler.get(".") if isinstance(handler, Mapping) else None
        if isinstance(attributes, Mapping) and attributes.get("rank_policy"):
            chosen[str(name)] = str(attributes["rank_policy"])
    return chosen


def _policy_for(
    handler: logging.Handler,
    chosen: Mapping[str, str],
    world_size: int | None,
    policy_timeout: float,
) -> Callable[[], RankPolicy] | None:
    """What makes the handler's rank policy (a fresh one each call), if it has one.

    ``chosen`` (--policy over the config file's) first, then the class's declaration.
    Other handlers, like a stdlib one from a --config file, see every record."""
    name = handler.get_name() or type(handler).__name__
    declared = handler if isinstance(handler, DeclaresRanks) else None
    spec = chosen.get(name) or (declared.default_rank_policy if declared else None)
    if spec is None:
        return None
    return functools.partial(
        make_policy,
        spec,
        name,
        rename=not (declared and declared.keeps_ranks_apart),
        timeout=policy_timeout,
        world_size=world_size,
    )


def install_backends(
    config: dict[str, Any],
    policies: Mapping[str, str] | None = None,
    *,
    world_size: int | None = None,
    policy_timeout: float = DEFAULT_POLICY_TIMEOUT,
) -> list[Runner]:
    """Apply ``config`` and give every handler it attached a runner of its own.

    The handlers are taken out of the logger tree (so that the SDKs' own log lines in this
    process do not reach them); each runner keeps the route its handler had. ``policies``
    maps handler names (``tensorboard``, or a key of the config's ``handlers``) to a rank
    policy that runs in front of that handler. A config file can choose one too, with
    dictConfig's attribute key: ``".": {"rank_policy": "mean"}``. The runners start once
    :meth:`Runner.attach_journal` says where to read.
    """
    policies = dict(policies or {})
    chosen = {**_configured_policies(config), **policies}
    try:
        logging.config.dictConfig(config)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        # dictConfig says which handler; its cause says why (a missing directory, a typo).
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(f"logging configuration failed: {exc}{cause}") from exc
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
    attached = detach_handlers(
        logger for logger in loggers if not logger.name.startswith("ranklog")
    )
    runners = [
        Runner(
            Feed(
                Sink(handler, route),
                policy=_policy_for(handler, chosen, world_size, policy_timeout),
            )
        )
        for handler, route in attached
    ]
    names = [str(runner.name) for runner in runners]
    missing = unknown_backends(policies, names)
    if missing:
        for runner in runners:
            runner.sink.handler.close()
        raise ConfigError(
            f"--policy names backend(s) {', '.join(missing)} that the configuration does not "
            f"have; configured: {', '.join(names) or 'none'}"
        )
    return runners

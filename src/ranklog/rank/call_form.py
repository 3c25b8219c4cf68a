"""Which of InstructLab's two ``setup_metric_logger`` call forms a call is, and what the
embedded collector is to run for it (:class:`Plan`), every name checked on the rank.

- the older ``setup_metric_logger(loggers, run_name, output_dir)``: ``loggers`` names the
  backends (``"async,tensorboard,wandb"``, or a list);
- today's ``setup_metric_logger(output_dir, *, tensorboard_log_dir=..., wandb_project=...,
  mlflow_tracking_uri=..., ...)``: JSONL (``async``) is always on, TensorBoard when
  ``tensorboard_log_dir`` is given, W&B when ``wandb_project`` or ``WANDB_PROJECT`` is,
  MLflow when a tracking URI or experiment name is (argument or ``MLFLOW_*``).

The rule: a first argument made only of backend names (a list, or a comma-separated string
with a known backend in it) is the older form, as is any call with a second positional
argument; anything else in first place is an output dir. With no first argument, the
InstructLab keywords above choose today's form.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ranklog.errors import ConfigError
from ranklog.names import (
    BACKEND_NAMES,
    BACKEND_OPTIONS,
    check_run_name,
    format_policy_spec,
    near_backend,
    parse_logger_types,
    parse_policy_spec,
)


@dataclass
class Plan:
    """What the embedded collector is to run, from either call form."""

    loggers: list[str]
    run_name: str | None
    output_dir: Path
    options: dict[str, str | None]
    policies: dict[str, str]
    extra_args: list[str]

    def collector_args(self) -> list[str]:
        args = ["--logger-type", ",".join(self.loggers)]
        if self.run_name is not None:
            args += ["--run-name", self.run_name]
        if self.policies:
            args += ["--policy", format_policy_spec(self.policies)]
        for key, value in self.options.items():
            if value is not None and BACKEND_OPTIONS[key][0] in self.loggers:
                args += [f"--{key.replace('_', '-')}", value]
        return [*args, *self.extra_args]


def plan(
    first: str | Sequence[str] | os.PathLike[str] | None,
    run_name: str | None,
    output_dir: str | os.PathLike[str] | None,
    options: dict[str, str | None],
    policy: str | Mapping[str, str] | None,
    extra_args: list[str],
) -> Plan | None:
    """Read either call form and check every name; None when no backend is asked for."""
    if _is_backend_list(first) or run_name is not None:
        if not first:
            return None
        loggers = parse_logger_types(first)  # type: ignore[arg-type]
    else:
        path = cast("str | os.PathLike[str] | None", first)  # not a list of backends
        _check_not_a_typo(path)
        if path is not None and output_dir is not None:
            raise ConfigError(f"output dir given twice: {path!r} and output_dir={output_dir!r}")
        today = path is not None or any(value is not None for value in options.values())
        output_dir = path if path is not None else output_dir
        loggers = _detected_backends(options) if today else ["async"]
    check_run_name(run_name)
    for key in ("wandb_run_name", "mlflow_run_name"):
        check_run_name(options[key])
    policies = parse_policy_spec(policy)  # a typo fails here, on the rank, not in the child
    configured = "--config" in extra_args
    missing = [name for name in policies if name not in loggers]
    if missing and not configured:
        raise ConfigError(
            f"policy names backend(s) {', '.join(missing)} that are not among the loggers "
            f"({', '.join(loggers)})"
        )
    return Plan(loggers, run_name, Path(output_dir or "logs"), options, policies, list(extra_args))


def _check_not_a_typo(path: object) -> None:
    """A single word a typo away from a backend name (``"asynx"``) was meant as one; an
    output dir of that name would be made silently. A path (``"./asynx"``, a ``Path``)
    or ``output_dir="asynx"`` says it is a folder."""
    if isinstance(path, str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", path):
        near = near_backend(path)
        if near is not None:
            raise ConfigError(
                f"setup_metric_logger({path!r}): not a backend name; did you mean {near!r}? "
                f"(for an output dir of that name pass './{path}' or output_dir={path!r})"
            )


def _is_backend_list(first: object) -> bool:
    if isinstance(first, list | tuple):
        return True
    if not isinstance(first, str):
        return False
    names = [name.strip() for name in first.split(",")]
    return any(name in BACKEND_NAMES for name in names) and (len(names) > 1 or "/" not in first)


def _detected_backends(options: Mapping[str, str | None]) -> list[str]:
    """Today's InstructLab: JSONL always, the others when their settings are there."""
    loggers = ["async"]
    if options["tensorboard_log_dir"]:
        loggers.append("tensorboard")
    if options["wandb_project"] or os.environ.get("WANDB_PROJECT"):
        loggers.append("wandb")
    mlflow_keys = ("mlflow_tracking_uri", "mlflow_experiment_name")
    mlflow_env = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
    if any(options[k] for k in mlflow_keys) or any(os.environ.get(k) for k in mlflow_env):
        loggers.append("mlflow")
    return loggers


def warn_unused(
    endpoint: str,
    loggers: object,
    run_name: str | None,
    output_dir: object,
    options: Mapping[str, str | None],
    policy: object,
) -> None:
    """With an explicit endpoint the collector there has its own settings: say which of
    these it will not see."""
    given = {"loggers": loggers, "run_name": run_name, "output_dir": output_dir,
             "policy": policy, **options}  # fmt: skip
    unused = [name for name, value in given.items() if value is not None]
    if unused:
        warnings.warn(
            f"ranklog: records go to the collector at {endpoint}, which runs with its own "
            f"settings; these setup_metric_logger arguments are not used: {', '.join(unused)}",
            RuntimeWarning,
            stacklevel=3,
        )

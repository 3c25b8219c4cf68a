"""InstructLab's setup functions, with the backends moved into the collector."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ranklog.endpoints import ENDPOINT_ENV, bind_address_for, is_local_only
from ranklog.filters import FormatDictFilter, IsMappingFilter
from ranklog.names import format_policy_spec, parse_logger_types, parse_policy_spec
from ranklog.rank.handler import ZMQSocketHandler
from ranklog.rank.identity import derived_endpoint, detect_identity

PACKAGE_LOGGER = "instructlab.training"
METRICS_LOGGER = "instructlab.training.metrics"
COLLECTOR_LOG = "ranklog-collector.log"

_attached: list[tuple[logging.Logger, ZMQSocketHandler]] = []
_embedded_collector: subprocess.Popen[bytes] | None = None


def propagate_package_logs(enabled: bool = True, package: str = PACKAGE_LOGGER) -> None:
    """Let (or stop) ``package``'s logs propagate to the root logger."""
    logging.getLogger(package).propagate = enabled


def setup_root_logger(level: int | str = "DEBUG") -> None:
    """Console logging on the root logger: rich output, metrics dicts as ``k=v`` pairs."""
    propagate_package_logs()
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler()
    except ImportError:  # the rank side does not require rich
        handler = logging.StreamHandler()
    handler.addFilter(FormatDictFilter())
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", handlers=[handler])


def setup_metric_logger(
    loggers: str | list[str] = "async",
    run_name: str | None = None,
    output_dir: str | os.PathLike[str] = "logs",
    *,
    endpoint: str | None = None,
    logger_name: str = METRICS_LOGGER,
    level: int | str = logging.INFO,
    collector_args: list[str] | None = None,
    policy: str | Mapping[str, str] | None = None,
    **handler_kwargs: Any,
) -> ZMQSocketHandler | None:
    """Send ``logger_name``'s metric dicts to a collector that runs ``loggers``.

    With no ``endpoint`` (and no ``RANKLOG_ENDPOINT``), global rank 0 starts the collector
    as a child in its own session, bound where every rank of this job derives alike; it
    writes ``loggers`` (``"async,tensorboard,wandb"``) under ``output_dir`` and exits once all
    ranks said goodbye. With an endpoint, a collector is expected there already.
    ``policy`` picks the embedded collector's rank policy per backend, e.g.
    ``"tensorboard=mean,wandb=rank0"`` or ``{"tensorboard": "all"}`` (TensorBoard and W&B
    default to rank 0's records).

    >>> setup_metric_logger("async", output_dir="logs")  # doctest: +SKIP
    >>> logging.getLogger("instructlab.training.metrics").info({"loss": 0.5}, extra={"step": 1})
    ... # doctest: +SKIP
    """
    if not loggers:
        return None
    names = parse_logger_types(loggers)
    policies = parse_policy_spec(policy)  # a typo fails here, on the rank, not in the child
    propagate_package_logs()
    identity = detect_identity(
        rank=handler_kwargs.get("rank"), world_size=handler_kwargs.get("world_size")
    )
    explicit = endpoint or os.environ.get(ENDPOINT_ENV)
    target = explicit or derived_endpoint(identity)
    if not explicit and identity.rank == 0:
        _start_embedded_collector(
            target,
            names,
            run_name,
            Path(output_dir),
            identity.world_size,
            [
                *(["--policy", format_policy_spec(policies)] if policies else []),
                *(collector_args or []),
            ],
        )

    metrics_logger = logging.getLogger(logger_name)
    for logger, old in [item for item in _attached if item[0] is metrics_logger]:
        logger.removeHandler(old)
        old.close()
        _attached.remove((logger, old))
    handler = ZMQSocketHandler(target, **handler_kwargs)
    handler.addFilter(IsMappingFilter())
    metrics_logger.addHandler(handler)
    metrics_logger.setLevel(level)
    logging.getLogger(PACKAGE_LOGGER).setLevel(logging.INFO)
    handler.start()
    _attached.append((metrics_logger, handler))
    return handler


def _start_embedded_collector(
    endpoint: str,
    loggers: list[str],
    run_name: str | None,
    output_dir: Path,
    world_size: int,
    extra_args: list[str],
) -> None:
    global _embedded_collector
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "ranklog",
        "collect",
        "--bind",
        bind_address_for(endpoint),
        "--output-dir",
        str(output_dir),
        "--logger-type",
        ",".join(loggers),
        "--world-size",
        str(world_size),
        "--exit-when-done",
    ]
    if run_name is not None:
        command += ["--run-name", run_name]
    if not is_local_only(endpoint):
        command.append("--allow-remote")
    command += extra_args
    with open(output_dir / COLLECTOR_LOG, "ab") as log_file:
        # Its own session: a torchrun tear-down of the worker group must not kill it mid-drain.
        _embedded_collector = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish_metric_logger(timeout: float = 60.0) -> int | None:
    """Close the handlers ``setup_metric_logger`` attached (flush, goodbye); if this process
    started the embedded collector, wait up to ``timeout`` seconds for it to finish writing.

    Returns the collector's exit code, or None when this process did not start one (or it
    is still running after ``timeout``).
    """
    global _embedded_collector
    while _attached:
        logger, handler = _attached.pop()
        logger.removeHandler(handler)
        handler.close()
    collector, _embedded_collector = _embedded_collector, None
    if collector is None:
        return None
    try:
        return collector.wait(timeout)
    except subprocess.TimeoutExpired:
        return None

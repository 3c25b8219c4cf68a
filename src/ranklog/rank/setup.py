"""InstructLab's setup functions, with the backends moved into the collector."""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ranklog.endpoints import ENDPOINT_ENV
from ranklog.errors import ConfigError
from ranklog.filters import FormatDictFilter, IsMappingFilter
from ranklog.journal import spill_path
from ranklog.rank import call_form, job_keys
from ranklog.rank.call_form import Plan
from ranklog.rank.embedded import COLLECTOR_LOG, EmbeddedCollector
from ranklog.rank.handler import ZMQSocketHandler
from ranklog.rank.identity import RankIdentity, derived_endpoint, detect_identity
from ranklog.rank.supervisor import Supervisor

PACKAGE_LOGGER = "instructlab.training"
METRICS_LOGGER = "instructlab.training.metrics"

_attached: list[tuple[logging.Logger, ZMQSocketHandler]] = []
_embedded_collector: Supervisor | None = None


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
    loggers: str | Sequence[str] | os.PathLike[str] | None = None,
    run_name: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    tensorboard_log_dir: str | os.PathLike[str] | None = None,
    wandb_project: str | None = None,
    wandb_entity: str | None = None,
    wandb_run_name: str | None = None,
    mlflow_tracking_uri: str | None = None,
    mlflow_experiment_name: str | None = None,
    mlflow_run_name: str | None = None,
    endpoint: str | None = None,
    logger_name: str = METRICS_LOGGER,
    level: int | str = logging.INFO,
    collector_args: list[str] | None = None,
    policy: str | Mapping[str, str] | None = None,
    **handler_kwargs: Any,
) -> ZMQSocketHandler | None:
    """Send ``logger_name``'s metric dicts to a collector that runs the backends.

    Both of InstructLab's call forms work: the older ``setup_metric_logger(loggers,
    run_name, output_dir)`` and today's ``setup_metric_logger(output_dir, *,
    tensorboard_log_dir=..., wandb_project=..., ...)`` (:mod:`ranklog.rank.call_form` says
    which backends each turns on, and how a call's form is told).

    With no ``endpoint`` (and no ``RANKLOG_ENDPOINT``), global rank 0 starts the collector
    as a child in its own session, bound where every rank of this job derives alike, and
    waits until it listens: if it cannot start, this raises :class:`ConfigError` with its
    reason. It exits once all ranks said goodbye. With an endpoint, a collector is expected
    there already, and the backend settings here are not used (a warning lists them).
    ``policy`` picks the embedded collector's rank policy per backend, e.g.
    ``"tensorboard=mean,wandb=rank0"`` or ``{"tensorboard": "all"}`` (TensorBoard, W&B and
    MLflow default to rank 0's records). Names are checked on every rank before anything
    starts; a mistake raises :class:`ConfigError` with one line naming it.

    >>> setup_metric_logger("async", output_dir="logs")  # doctest: +SKIP
    >>> setup_metric_logger("logs", wandb_project="p", tensorboard_log_dir="logs/tb")
    ... # doctest: +SKIP
    """
    _check_handler_arguments(handler_kwargs)
    options = {
        "tensorboard_log_dir": None if tensorboard_log_dir is None else str(tensorboard_log_dir),
        "wandb_project": wandb_project, "wandb_entity": wandb_entity,
        "wandb_run_name": wandb_run_name, "mlflow_tracking_uri": mlflow_tracking_uri,
        "mlflow_experiment_name": mlflow_experiment_name, "mlflow_run_name": mlflow_run_name,
    }  # fmt: skip
    plan = call_form.plan(loggers, run_name, output_dir, options, policy, collector_args or [])
    if plan is None:
        return None
    propagate_package_logs()
    given = handler_kwargs.get
    identity = detect_identity(rank=given("rank"), world_size=given("world_size"))
    explicit = endpoint or os.environ.get(ENDPOINT_ENV)
    if explicit:
        if identity.rank == 0:
            call_form.warn_unused(explicit, loggers, run_name, output_dir, options, policy)
        handler_kwargs = {"spill_dir": spill_path(plan.output_dir), **handler_kwargs}
        return _attach(explicit, logger_name, level, handler_kwargs)
    return _embedded(identity, plan, logger_name, level, handler_kwargs)


def _check_handler_arguments(handler_kwargs: Mapping[str, Any]) -> None:
    """Keywords setup does not take itself go to the handler: a misspelled one (say
    ``tensorbord_log_dir``) fails here, on every rank, before anything starts."""
    handler = set(inspect.signature(ZMQSocketHandler).parameters) - {"endpoint", "level"}
    unknown = [name for name in handler_kwargs if name not in handler]
    if not unknown:
        return
    known = [*inspect.signature(setup_metric_logger).parameters, *handler]
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"setup_metric_logger() got unknown argument(s): {', '.join(hints)}")


def _embedded(
    identity: RankIdentity,
    plan: Plan,
    logger_name: str,
    level: int | str,
    handler_kwargs: dict[str, Any],
) -> ZMQSocketHandler:
    """The embedded default: rank 0 starts the collector; every rank attaches a handler."""
    global _embedded_collector
    target = derived_endpoint(identity)
    collector_args = plan.collector_args()
    # Undeliverable records at exit go to the output dir, where the next collector (or
    # `ranklog replay`) takes them in; the collector's log is named in warnings.
    handler_kwargs = {
        "spill_dir": spill_path(plan.output_dir),
        "collector_log": plan.output_dir / COLLECTOR_LOG,
        **handler_kwargs,
    }
    key_file: Path | None = None
    if target.startswith("tcp://"):
        # Across nodes the collector listens on the network: only this job's ranks, which
        # hold its key, may connect (job_keys.py).
        folder = job_keys.key_folder(plan.output_dir, identity.run_id)
        keys = job_keys.share(identity, folder)
        collector_args += job_keys.collector_flags(folder)
        key_file = keys.client_key_file()
        handler_kwargs.update(curve_server_key=keys.server_public, curve_key_file=key_file)
    if identity.rank == 0:
        _check_space(plan.output_dir)
        _embedded_collector = EmbeddedCollector(
            target, plan.output_dir, identity.world_size, collector_args
        ).supervised(_still_logging)
    try:
        return _attach(target, logger_name, level, handler_kwargs)
    finally:
        if key_file is not None:  # read by the handler; no copy of the secret stays around
            shutil.rmtree(key_file.parent, ignore_errors=True)


def _check_space(output_dir: Path) -> None:
    """A full output dir fails setup now, in one line: the collector could not even log why
    it cannot start."""
    probe = output_dir / f".ranklog-probe-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as file:
            file.write(bytes(64 << 10))
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        raise ConfigError(f"cannot write to the output dir {output_dir}: {exc.strerror}") from None
    finally:
        probe.unlink(missing_ok=True)


def _attach(
    target: str, logger_name: str, level: int | str, handler_kwargs: dict[str, Any]
) -> ZMQSocketHandler:
    metrics_logger = logging.getLogger(logger_name)
    for logger, old in [item for item in _attached if item[0] is metrics_logger]:
        logger.removeHandler(old)
        old.close()
        _attached.remove((logger, old))
    handler = ZMQSocketHandler(target, **handler_kwargs)
    handler.serves_logger = logger_name
    handler.addFilter(IsMappingFilter())
    metrics_logger.addHandler(handler)
    metrics_logger.setLevel(level)
    logging.getLogger(PACKAGE_LOGGER).setLevel(logging.INFO)
    handler.start()
    _attached.append((metrics_logger, handler))
    return handler


def _still_logging() -> bool:
    """Rank 0's handlers are open: a collector that dies now is restarted (not once they
    close: at finish, at exit, or on a signal)."""
    return any(not handler._sender.closed for _, handler in _attached)


def finish_metric_logger(timeout: float = 60.0) -> int | None:
    """Close the handlers ``setup_metric_logger`` attached (flush, goodbye); if this process
    started the embedded collector, wait up to ``timeout`` seconds for it to finish writing.

    Returns the collector's exit code, or None when this process did not start one (or it
    is still running after ``timeout``).
    """
    global _embedded_collector
    if _embedded_collector is not None:
        _embedded_collector.stop()  # what the collector does from now on is on purpose
    while _attached:
        logger, handler = _attached.pop()
        logger.removeHandler(handler)
        handler.close()
    collector, _embedded_collector = _embedded_collector, None
    return None if collector is None else collector.wait(timeout)

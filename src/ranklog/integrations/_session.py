"""What the three adapters share: settings checked when the adapter is built, one
``setup_metric_logger`` per training run on every rank, hyper-parameters once, records at a
step, and the finish."""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from ranklog.endpoints import ENDPOINT_ENV
from ranklog.errors import ConfigError
from ranklog.names import check_run_name, parse_logger_types, parse_policy_spec
from ranklog.rank.handler import ZMQSocketHandler
from ranklog.rank.identity import derived_endpoint, detect_identity
from ranklog.rank.setup import METRICS_LOGGER, finish_metric_logger, setup_metric_logger

# The adapter tells setup who this rank is; everything else is the user's to set.
_SET_BY_THE_ADAPTER = ("rank", "world_size")


def _known_settings() -> list[str]:
    own = [
        name
        for name, parameter in inspect.signature(setup_metric_logger).parameters.items()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    handler = [name for name in inspect.signature(ZMQSocketHandler).parameters if name != "level"]
    return [name for name in dict.fromkeys([*own, *handler]) if name not in _SET_BY_THE_ADAPTER]


def check_settings(adapter: str, settings: Mapping[str, Any]) -> None:
    """A misspelled or misvalued setting fails where the adapter is built, before training
    starts, in one line naming it (``setup_metric_logger`` would only see it on train begin)."""
    known = _known_settings()
    unknown = [name for name in settings if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{adapter}() got unknown setting(s): {', '.join(hints)}")
    if isinstance(settings.get("loggers"), str | list | tuple):
        parse_logger_types(settings["loggers"])
    parse_policy_spec(settings.get("policy"))
    for key in ("run_name", "wandb_run_name", "mlflow_run_name"):
        check_run_name(settings.get(key))


def scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """Values a framework hands over, as ranklog takes them (a one-element tensor stays a
    tensor: the handler converts it)."""
    return {str(key): value for key, value in values.items()}


class RankSession:
    """One rank's ranklog for one training run: set up, log, finish."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._settings = dict(settings)
        self._logger = logging.getLogger(self._settings.get("logger_name", METRICS_LOGGER))
        self._open = False
        self._hparams_sent = False
        self._said_closed = False

    def start(self, rank: int | None = None, world_size: int | None = None) -> None:
        """Set up on this rank (the embedded collector unless an endpoint is configured);
        a second call while open does nothing."""
        if self._open:
            return
        rank = detect_identity(rank=rank, world_size=world_size).rank
        settings = {**self._settings, "rank": rank, "world_size": world_size}
        endpoint = _shared_endpoint(settings, rank, world_size)
        if endpoint is not None and rank != 0:
            settings["endpoint"] = endpoint
        setup_metric_logger(**settings)
        self._open, self._said_closed = True, False
        if endpoint is not None and rank == 0:
            _broadcast(endpoint)

    def hparams(self, values: Mapping[str, Any]) -> None:
        """The run's hyper-parameters, once per run (a framework may hand them over again)."""
        if not self._open:
            self._say_closed("hyper-parameters")
        elif not self._hparams_sent:
            self._logger.info(scalars(values), extra={"hparams": True})
            self._hparams_sent = True

    def record(self, values: Mapping[str, Any], step: int | None) -> None:
        if not self._open:
            self._say_closed(f"values at step {step}")
        elif values:
            extra = {} if step is None else {"step": int(step)}
            self._logger.info(scalars(values), extra=extra)

    def _say_closed(self, what: str) -> None:
        """Values a framework hands over before training began or after it finished are
        not logged: say so, once."""
        if not self._said_closed:
            self._said_closed = True
            warnings.warn(
                f"ranklog: {what} arrived before training began or after it finished; "
                "they are not logged (said once until training starts again)",
                RuntimeWarning,
                stacklevel=3,
            )

    def finish(self, timeout: float = 60.0) -> None:
        """Flush and say goodbye (rank 0 waits for its collector to finish writing)."""
        if self._open:
            self._open = False
            self._hparams_sent = False
            finish_metric_logger(timeout)


def _shared_endpoint(settings: Mapping[str, Any], rank: int, size: int | None) -> str | None:
    """Where the embedded collector of a one-node job listens, told by rank 0 to the others
    through ``torch.distributed``: a launcher that is not torchrun (Lightning's starts the
    other ranks from rank 0's process) gives the ranks different parents, so they cannot
    derive the ``ipc://`` path alike. None: each rank derives it (or one is configured)."""
    if settings.get("endpoint") or os.environ.get(ENDPOINT_ENV) or not _distributed():
        return None
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        # torchrun's workers share their agent as parent and derive the same path; no
        # collective here, so a rank that never logs cannot leave rank 0 waiting on it.
        return None
    target = derived_endpoint(detect_identity(rank=rank, world_size=size))
    if not target.startswith("ipc://"):
        return None  # across nodes it is MASTER_ADDR's, the same on every rank
    return target if rank == 0 else _broadcast(None)


def _distributed() -> bool:
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _broadcast(endpoint: str | None) -> str:
    """Rank 0 sends its endpoint once its collector listens; the others receive it."""
    import torch.distributed as dist

    box = [endpoint]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])

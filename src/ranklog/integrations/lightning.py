"""Lightning: ``Trainer(logger=RanklogLogger(output_dir="logs"))``.

Lightning calls a logger's methods on every rank; its own loggers wrap them in
``@rank_zero_only``. This one does not, on purpose: every rank logs, and the collector's
rank policies decide what each backend keeps. The rank is Lightning's (the strategy's
global rank), so it works under Lightning's own launcher as well as under torchrun.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from ranklog.integrations._session import RankSession, check_settings


class RanklogLogger(Logger):  # type: ignore[misc]
    """``log_hyperparams`` sends hyper-parameters once; ``log_metrics`` a record at ``step``.

    ``settings`` are ``setup_metric_logger``'s keywords (``output_dir``,
    ``tensorboard_log_dir``, ``wandb_project``, ..., ``policy``, ``endpoint``); a misspelled
    one raises :class:`ranklog.ConfigError` here. Sets up on the first call (the process
    group is up by then), finishes in ``finalize``; a run that raises is finalized by
    Lightning with ``"failed"``, which flushes too.
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        check_settings(type(self).__name__, settings)
        self._session = RankSession(settings)
        self._run_name: str | None = settings.get("run_name")

    @property
    def name(self) -> str:
        return "ranklog"

    @property
    def version(self) -> str | None:
        return self._run_name

    def _start(self) -> None:
        # The world size follows from the launcher's environment or the process group.
        self._session.start(rank=getattr(rank_zero_only, "rank", 0))

    def log_hyperparams(
        self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        self._start()
        values = vars(params) if isinstance(params, Namespace) else params
        self._session.hparams(dict(values))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._start()
        self._session.record(metrics, step)

    def save(self) -> None:
        """Nothing to do: the collector writes, and records are on their way already."""

    def finalize(self, status: str) -> None:
        self._session.finish()

"""Accelerate: ``Accelerator(log_with=RanklogTracker(output_dir="logs"))``.

Accelerate gates trackers twice: a tracker's ``main_process_only`` (set False here), and
``Accelerator.init_trackers`` / ``Accelerator.log`` themselves, which run on the main
process only. Building a ``RanklogTracker`` therefore wraps those two methods (once, for
every ``Accelerator``) so that on the other ranks they still reach the RanklogTrackers in
``log_with``; other trackers keep Accelerate's behaviour. Every rank logs, on purpose, and
the collector's rank policies decide what each backend keeps.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.tracking import GeneralTracker

from ranklog.integrations._session import RankSession, check_settings


class RanklogTracker(GeneralTracker):  # type: ignore[misc]
    """``init_trackers(project, config)`` sends ``config`` as hyper-parameters,
    ``accelerator.log(values, step)`` a record, ``end_training()`` finishes.

    ``settings`` are ``setup_metric_logger``'s keywords (``output_dir``,
    ``tensorboard_log_dir``, ``wandb_project``, ..., ``policy``, ``endpoint``); a misspelled
    one raises :class:`ranklog.ConfigError` here. A run that raises is flushed (or spilled)
    at exit, as ``logging.shutdown()`` does.
    """

    name = "ranklog"
    requires_logging_directory = False
    main_process_only = False

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        check_settings(type(self).__name__, settings)
        self._session = RankSession(settings)
        _reach_every_rank()

    @property
    def tracker(self) -> RankSession:
        return self._session

    def start(self) -> None:
        state = PartialState()
        self._session.start(rank=state.process_index, world_size=state.num_processes)

    def store_init_configuration(self, values: Mapping[str, Any]) -> None:
        self._session.hparams(values)

    def log(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self._session.record(values, step)

    def finish(self) -> None:
        self._session.finish()


def _skipped_here() -> bool:
    """Accelerate's main-process gate returned without calling any tracker on this rank."""
    state = PartialState()
    return bool(state.use_distributed and not state.is_main_process)


def _reach_every_rank() -> None:
    if getattr(Accelerator.log, "_ranklog_every_rank", False):
        return
    init_trackers, log = Accelerator.init_trackers, Accelerator.log

    @functools.wraps(init_trackers)
    def init_on_every_rank(
        self: Accelerator,
        project_name: str,
        config: dict[str, Any] | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        init_trackers(self, project_name, config, init_kwargs)
        if _skipped_here():
            for tracker in _ranklog_trackers(self):
                self.trackers.append(tracker)  # end_training() finishes it on this rank too
                tracker.start()
                if config is not None:
                    tracker.store_init_configuration(config)

    @functools.wraps(log)
    def log_on_every_rank(
        self: Accelerator,
        values: dict[str, Any],
        step: int | None = None,
        log_kwargs: dict[str, Any] | None = None,
    ) -> None:
        log(self, values, step, log_kwargs)
        if _skipped_here():
            for tracker in _ranklog_trackers(self):
                tracker.log(values, step=step, **(log_kwargs or {}).get(tracker.name, {}))

    log_on_every_rank._ranklog_every_rank = True  # type: ignore[attr-defined]
    Accelerator.init_trackers = init_on_every_rank
    Accelerator.log = log_on_every_rank


def _ranklog_trackers(accelerator: Accelerator) -> list[RanklogTracker]:
    return [t for t in accelerator.log_with if isinstance(t, RanklogTracker)]

"""HuggingFace ``Trainer``: ``Trainer(..., callbacks=[RanklogCallback(output_dir="logs")])``.

Transformers calls a callback's events on every rank; its own reporting callbacks return
early unless ``state.is_world_process_zero``. This one does not, on purpose: every rank
logs, and the collector's rank policies decide what each backend keeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ranklog.integrations._session import RankSession, check_settings


class RanklogCallback(TrainerCallback):  # type: ignore[misc]
    """Sends the training arguments once as hyper-parameters and every ``on_log`` /
    ``on_evaluate`` as a record at ``state.global_step``.

    ``settings`` are ``setup_metric_logger``'s keywords (``output_dir``,
    ``tensorboard_log_dir``, ``wandb_project``, ..., ``policy``, ``endpoint``); a misspelled
    one raises :class:`ranklog.ConfigError` here. Sets up on train begin, finishes on train
    end; a run that raises is flushed (or spilled) at exit, as ``logging.shutdown()`` does.
    """

    def __init__(self, **settings: Any) -> None:
        check_settings(type(self).__name__, settings)
        self._session = RankSession(settings)
        self._last_logged: Mapping[str, Any] | None = None

    def _start(self, args: TrainingArguments) -> None:
        self._session.start(rank=args.process_index, world_size=args.world_size)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self._start(args)
        self._session.hparams(args.to_sanitized_dict())

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> None:
        self._start(args)  # an evaluate() after train() logs too
        self._session.record(logs or {}, state.global_step)
        self._last_logged = logs

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> None:
        # Trainer.evaluate() passes the metrics it has just logged: send them once.
        if metrics and metrics is not self._last_logged and metrics != self._last_logged:
            self._start(args)
            self._session.record(metrics, state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self._session.finish()

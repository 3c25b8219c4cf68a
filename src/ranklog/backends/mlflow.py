"""``MLflowHandler``: InstructLab's MLflow backend, run in the collector (``ranklog[mlflow]``)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ranklog.backends.protocol import follow_job
from ranklog.flatten import flatten_dict
from ranklog.run_name import run_name_for

_log = logging.getLogger(__name__)
#: The job of a handler with no run yet: the first record's job differs from it.
_NO_RUN = object()


class MLflowHandler(logging.Handler):
    """Log each metrics dict to one MLflow run; hyper-parameters become run params.

    Keys are flattened with ``.`` as InstructLab does; only numeric values become metrics.
    ``tracking_uri`` and ``experiment_name`` default to ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_EXPERIMENT_NAME``; with no tracking URI at all the run goes to MLflow's default
    SQLite store, as ``log_dir/mlflow.db`` (that needs the full ``mlflow`` package; with
    ``mlflow-skinny`` point ``tracking_uri`` at a server). ``mlflow_init_kwargs`` go to
    ``create_run`` (``tags``, ``start_time``). The run starts at the first record and ends
    on close; one run per job: the first record of another job (``run_id``) ends it and
    starts a new one, named from ``run_name`` again. A failure to start is reported once;
    the collector's other backends go on.

    At least once after a crash: it implements none of ``protocol.Resumable``'s hooks.
    Metrics already sent to a tracking server cannot be cut back to a checkpoint, so after
    a crash of the backends' process the records since its last checkpoint (about the last
    second) are sent again, and a new run is started for them.

    >>> handler = MLflowHandler(tracking_uri="http://localhost:5000")  # doctest: +SKIP
    """

    #: Rank policy the collector puts in front of this handler unless told otherwise.
    default_rank_policy: str | None = "rank0"
    keeps_ranks_apart: bool = False

    def __init__(
        self,
        level: int | str = logging.INFO,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        log_dir: str | os.PathLike[str] = "logs",
        **mlflow_init_kwargs: Any,
    ) -> None:
        super().__init__(level)
        self.run_name = run_name
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.experiment_name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        self.log_dir = Path(log_dir)
        self.mlflow_init_kwargs = mlflow_init_kwargs
        self.run_id: str | None = None
        self.failure: str | None = None
        self.dropped = 0
        self._drops_said = False
        self._client: Any = None
        self._experiment_id = "0"
        #: The job the run is of (see follow_job); none before the first record.
        self.job: object = _NO_RUN
        self._started = datetime.now()

    def _setup(self, record: logging.LogRecord) -> bool:
        # The client API, not mlflow's fluent one: its active-run state is per thread and
        # global, and this handler lives on a backend thread of the collector.
        try:
            from mlflow.tracking import MlflowClient

            # MLflow's own default (an SQLite file), placed under log_dir rather than in
            # whatever directory the collector happens to run in.
            uri = self.tracking_uri or f"sqlite:///{self.log_dir.resolve() / 'mlflow.db'}"
            if not self.tracking_uri:
                self.log_dir.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(tracking_uri=uri)
            if self.experiment_name:
                experiment = client.get_experiment_by_name(self.experiment_name)
                self._experiment_id = (
                    experiment.experiment_id
                    if experiment is not None
                    else client.create_experiment(self.experiment_name)
                )
            self._client = client
            follow_job(self, record)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            _log.error(
                "backend mlflow: starting the run failed (%s); MLflow is off for this run, "
                "the other backends go on",
                self.failure,
            )
            self._client = None
            return False
        return True

    def start_job(self, job: str | None, first: logging.LogRecord) -> None:
        """End the last job's run, if one; start this job's, named for ``first``."""
        now = self._started
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, end_time=int(time.time() * 1000))
            now = datetime.now()
        name = run_name_for(self.run_name, first, now=now)
        run = self._client.create_run(self._experiment_id, run_name=name, **self.mlflow_init_kwargs)
        self.run_id = run.info.run_id

    def emit(self, record: logging.LogRecord) -> None:
        if self.failure is not None:
            self.dropped += 1
            return
        if not isinstance(record.msg, Mapping):
            return
        if self._client is None and not self._setup(record):
            self.dropped += 1
            return
        try:
            from mlflow.entities import Metric, Param

            follow_job(self, record)  # the next job: a run of its own
            flat = flatten_dict(record.msg, sep=".")
            if getattr(record, "hparams", False):
                params = [Param(key, str(value)) for key, value in flat.items()]
                self._client.log_batch(self.run_id, params=params)
                return
            step = getattr(record, "step", None) or 0
            millis = int(record.created * 1000)
            metrics = []
            for key, value in flat.items():
                try:
                    metrics.append(Metric(key, float(value), millis, step))
                except (TypeError, ValueError):
                    continue  # MLflow metrics are numbers only, as in InstructLab
            if metrics:
                self._client.log_batch(self.run_id, metrics=metrics)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        """End the run."""
        client, self._client = self._client, None
        if client is not None:
            client.set_terminated(self.run_id, end_time=int(time.time() * 1000))
        if self.dropped and not self._drops_said:  # once: logging.shutdown closes it again
            self._drops_said = True
            _log.warning(
                "backend mlflow: %d record(s) dropped after it failed to start", self.dropped
            )
        super().close()

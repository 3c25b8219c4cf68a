"""``WandbHandler``: InstructLab's Weights & Biases backend, run in the collector."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ranklog.backends.owned_files import OwnedFiles
from ranklog.backends.protocol import OFFSET_ATTR, follow_job, job_of
from ranklog.backends.wandb_log import (
    logged_through,
    remove_empty_logs,
    settle,
    teardown_within,
    wait_finished,
    wait_service_gone,
)
from ranklog.backends.wandb_values import loggable
from ranklog.flatten import flatten_dict
from ranklog.reporting import ReportOnce
from ranklog.run_name import run_name_for

_log = logging.getLogger(__name__)
#: The job of a handler that has seen no record yet: the first record's job is its own.
_FIRST = object()


class WandbHandler(logging.Handler):
    """Log each metrics dict to one W&B run; hyper-parameters go to the run's config.

    ``wandb.init(dir=log_dir, name=run_name, config={}, **wandb_init_kwargs)`` runs lazily,
    at the first record. ``WANDB_*`` environment variables keep their meaning: ``WANDB_MODE``
    (``offline`` needs no account), ``WANDB_PROJECT``, ``WANDB_ENTITY``; ``WANDB_DIR`` and
    ``WANDB_NAME`` apply when ``log_dir`` / ``run_name`` are left at their defaults. Console
    capture is off (the collector's console is not the training's) unless ``settings`` or
    ``WANDB_CONSOLE`` say otherwise. ``{rank}`` and ``{local_rank}`` in ``run_name`` are the
    rank of the records it gets: 0 under the default ``rank0`` policy, and the job's rank 0
    under a policy that merges ranks (``first``, ``all`` with renamed keys, ``mean``...).

    Rows go out with ``run.log(flat, step=step)`` in non-decreasing step order: a record whose
    step is lower than one already logged is dropped and counted (W&B would drop it
    silently). Each row's ``_timestamp`` is the time the rank logged it (``record.created``),
    not the time the collector got to it, unless the record has a ``_timestamp`` of its own.
    A record without a step goes to the run's summary, never into a row; a value W&B cannot
    encode is logged as its text, with one warning per key. If ``wandb.init`` fails, that is
    reported once and later records are dropped and counted; the collector's other backends
    go on either way. ``close`` finishes the run and returns once its log on disk holds every
    row (at most ``close_timeout`` s; a timeout is reported).

    One run per job: the first record of another job (``run_id``) finishes the current run
    and starts a new one, named from ``run_name`` again (``{time}``: when it starts). A job
    seen again resumes its own run after the last step that run holds.

    Exactly once after a crash (``protocol.Resumable``): its state is each job's run id,
    chosen and checkpointed before ``wandb.init``, and the last step handed to W&B with its
    journal offset (``OFFSET_ATTR``). W&B writes asynchronously: a restart reads every log of
    the run to learn which steps landed, resumes the run and replays from there. It is not
    ``Rewindable``: rows handed to W&B cannot be taken back, so a write error is its own to
    report (W&B's service writes the files, not this process).

    >>> handler = WandbHandler(run_name="exp1", log_dir="logs", project="demo")  # doctest: +SKIP
    """

    #: Rank policy the collector puts in front of this handler unless told otherwise.
    default_rank_policy: str | None = "rank0"
    keeps_ranks_apart: bool = False
    checkpoint_paths: tuple[str, ...] = ("sync_file", "wandb_dir")  # relative in checkpoints

    def __init__(
        self,
        level: int | str = logging.INFO,
        run_name: str | None = None,
        log_dir: str | os.PathLike[str] = "logs",
        **wandb_init_kwargs: Any,
    ) -> None:
        super().__init__(level)
        self.log_dir = Path(log_dir)
        self.run_name = run_name
        # None means "not given" (InstructLab passes project=None, entity=None): let W&B's
        # own defaults and WANDB_* variables decide.
        self.wandb_init_kwargs = {k: v for k, v in wandb_init_kwargs.items() if v is not None}
        self.failure: str | None = None
        self.dropped = 0
        self._drops_said = False
        self._report = ReportOnce(_log)
        self._run: Any = None
        self._last_step: int | None = None
        self._started = datetime.now()
        self._runs_started = 0
        # The job being logged, each job's run id, and where W&B keeps the runs' logs.
        self.job: object = _FIRST
        self._runs: dict[str, str] = {}
        self._wandb_dir: Path | None = None
        # The job's run to start or resume (after a collector restart, or a job seen again),
        # its log, and the last step that run already holds.
        self._resume_id: str | None = None
        self._resuming = False
        self._sync_file: str | None = None
        self._written_through: int | None = None
        # (step, journal offset) of the last row handed to W&B, at each checkpoint: W&B
        # writes asynchronously, so a restart resumes from the newest mark its log covers.
        self._last_offset: int | None = None
        self._marks: list[tuple[int, int]] = []
        self.owned_files = OwnedFiles()  # none but its run: opened() when a run starts
        #: Seconds a finished run gets to be complete on disk (the collector's drain timeout).
        self.close_timeout = 30.0

    @property
    def out_of_order(self) -> int:
        """Records dropped for a step lower than one already logged."""
        return self._report["out-of-order"]

    #: W&B's exit work, bounded (``HasExitTeardown``; ``wandb_log.teardown_within``).
    teardown_within = staticmethod(teardown_within)

    @property
    def run(self) -> Any:
        """The ``wandb`` run, once the first record started it."""
        return self._run

    def _init_kwargs(self, record: logging.LogRecord) -> dict[str, Any]:
        kwargs = dict(self.wandb_init_kwargs)
        if _named_dir(self.wandb_init_kwargs) is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(self.log_dir)
        if "name" not in kwargs and (self.run_name is not None or "WANDB_NAME" not in os.environ):
            now = datetime.now() if self._runs_started else self._started
            kwargs["name"] = run_name_for(self.run_name, record, now=now)
        kwargs.setdefault("config", {})
        if self._resume_id is not None:
            kwargs["id"] = self._resume_id
        if self._resuming:
            kwargs["resume"] = "allow"  # created if the crash came before it existed
        if "settings" not in kwargs and "WANDB_CONSOLE" not in os.environ:
            # In the collector the console is the collector's own status lines, not the
            # training's output: nothing worth a W&B log tab.
            kwargs["settings"] = {"console": "off"}
        return kwargs

    def _setup(self, record: logging.LogRecord) -> bool:
        if self._resume_id is None:
            # Chosen (and checkpointed) before wandb.init: a collector killed during init
            # resumes this run rather than starting a second one.
            run_id = _new_run_id(self.wandb_init_kwargs.get("id"), self._runs.values())
            self._resume_id = self._runs[_job_key(job_of(record))] = run_id
            if self._wandb_dir is None:  # where a restart looks for the run's logs
                root = _named_dir(self.wandb_init_kwargs) or self.log_dir
                self._wandb_dir = Path(root).absolute() / "wandb"
            self._announce()
        try:
            import wandb

            self._run = wandb.init(**self._init_kwargs(record))
            self._runs_started += 1
            self._sync_file = os.path.abspath(self._run.settings.sync_file)
            self._wandb_dir = Path(self._sync_file).parent.parent
        except Exception as exc:  # no account, no network, bad settings: all the same here
            self.failure = f"{type(exc).__name__}: {exc}"
            _log.error(
                "backend wandb: wandb.init failed (%s); W&B is off for this run, the other "
                "backends go on; records for W&B are dropped and counted",
                self.failure,
            )
            return False
        self._announce()
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if self.failure is not None:
            self.dropped += 1
            return
        if not isinstance(record.msg, Mapping):
            return
        try:
            follow_job(self, record)
            step = getattr(record, "step", None)
            if self._holds(record, step):
                return  # replayed after a restart; the run has it
            if self._run is None and not self._setup(record):
                self.dropped += 1
                return
            self._log(record, record.msg, step)
        except Exception:
            self.handleError(record)

    def _log(self, record: logging.LogRecord, msg: Mapping[Any, Any], step: int | None) -> None:
        flat = loggable(flatten_dict(msg), self._report)
        if getattr(record, "hparams", False):
            self._run.config.update(flat, allow_val_change=True)
            return
        if step is None:
            # A row needs a step of its own; W&B would merge this into the row of the step
            # being logged and overwrite its values. The run's summary is W&B's place for
            # values that belong to no step.
            self._run.summary.update(flat)
            return
        flat.setdefault("_timestamp", record.created)  # the rank's time, not ours
        if self._last_step is not None and step < self._last_step:
            self._report(
                "out-of-order",
                "backend wandb: step %d arrived after step %d; W&B needs steps in "
                "order, so it is dropped (further ones are counted)",
                step,
                self._last_step,
            )
            return
        self._last_step = step
        self._run.log(flat, step=step)
        self._last_offset = getattr(record, OFFSET_ATTR, None)

    def _holds(self, record: logging.LogRecord, step: int | None) -> bool:
        """Whether the run being resumed has this record already (its hyper-parameters: a
        run that holds rows has them)."""
        if self._written_through is None:
            return False
        if step is None:
            return bool(getattr(record, "hparams", False))
        return step <= self._written_through

    def start_job(self, job: str | None, first: logging.LogRecord) -> None:
        """``first`` is ``job``'s first record: finish the last job's run; this job's run
        starts at its first row, or resumes after the rows it already holds if the job was
        seen."""
        if self.job is _FIRST:  # this handler's first job, or a checkpoint's from before jobs
            if self._resume_id is not None:
                self._runs.setdefault(_job_key(job), self._resume_id)
            return
        self._finish_run()
        self._resume_id = self._runs.get(_job_key(job))
        self._resuming = self._resume_id is not None
        self._written_through = logged_through(self._wandb_dir, self._resume_id)
        self._sync_file, self._last_step, self._last_offset, self._marks = None, None, None, []

    def _announce(self) -> None:
        """Have the collector record the run now, not at its next checkpoint (best effort:
        if that fails, say on a full disk, the next checkpoint records it)."""
        try:
            self.owned_files.opened()
        except Exception as exc:
            _log.warning("backend wandb: could not checkpoint the run yet (%s)", exc)

    def checkpoint(self) -> dict[str, Any]:
        """The job's run to resume after a crash, its transaction log to learn how far it
        got, and each job's run."""
        if self._run is not None and self._last_step is not None and self._last_offset is not None:
            mark = (self._last_step, self._last_offset)
            if not self._marks or self._marks[-1] != mark:
                self._marks = [*self._marks[-255:], mark]
        if self.job is _FIRST and self._resume_id is None:
            return {}
        # Every key, every time: the runner keeps the last checkpoint's keys not given again.
        state = {
            "run_id": self._resume_id,
            "sync_file": self._sync_file,
            "marks": self._marks,
            "writer_pid": os.getpid(),  # whose W&B service a restart waits out
            "wandb_dir": None if self._wandb_dir is None else str(self._wandb_dir),
        }
        if self.job is _FIRST:
            return state
        return {**state, "job": self.job, "runs": dict(self._runs)}

    def restore(self, state: dict[str, Any] | None, *, from_start: bool = False) -> int | None:
        """Resume the crashed run: the same run id (W&B merges its segments when synced), and
        no step again that its logs on disk already hold. Returns the journal offset to
        replay from: the newest checkpoint mark whose rows are all in those logs.
        ``from_start``: every job gets a new run (what W&B holds cannot be taken back)."""
        if from_start or not state or "run_id" not in state:
            return None
        self._runs = dict(state.get("runs") or {})
        self.job = state.get("job", _FIRST)
        if state.get("wandb_dir"):
            self._wandb_dir = Path(state["wandb_dir"])
        self._resume_id = run_id = state["run_id"]
        self._resuming = run_id is not None
        if state.get("sync_file"):
            self._sync_file = state["sync_file"]
            self._wandb_dir = Path(self._sync_file).parent.parent
        if run_id is None or self._wandb_dir is None:
            return None  # killed before the run was named: nothing logged yet
        # Killed inside wandb.init or just after, the checkpoint may not name the log yet
        # while W&B's service already wrote rows to it: every log of the run is read.
        service_gone = wait_service_gone(state.get("writer_pid"))
        if self._sync_file:
            settle(Path(self._sync_file))
        if service_gone:  # else it may be writing the log's first block still
            remove_empty_logs(self._wandb_dir, run_id)
        self._written_through = logged_through(self._wandb_dir, run_id)
        if self._written_through is None and not self._sync_file:
            return None  # no row logged: the checkpoint's offset holds
        self._marks = [(int(step), int(offset)) for step, offset in state.get("marks", [])]
        through = self._written_through
        safe = [offset for step, offset in self._marks if through is not None and step <= through]
        _log.info("backend wandb: resuming run %s after step %s", run_id, through)
        return max(safe, default=0)

    def _finish_run(self) -> None:
        """Finish the run; return once its log holds every row, or after ``close_timeout``."""
        run, self._run = self._run, None
        if run is None:
            return
        run.finish()
        if self._sync_file is None or run.settings.mode == "disabled":
            return  # nothing is written to disk
        if not wait_finished(Path(self._sync_file), self.close_timeout):
            _log.warning(
                "backend wandb: run %s is not complete on disk %gs after it finished (%s "
                "has no exit record yet); W&B's service may still be writing it",
                run.id,
                self.close_timeout,
                self._sync_file,
            )

    def close(self) -> None:
        """Finish the run (uploading it, unless offline) and report what was dropped."""
        self._finish_run()
        # Once: the collector closes it, then logging.shutdown closes it again at exit.
        if (self.dropped or self.out_of_order) and not self._drops_said:
            self._drops_said = True
            _log.warning(
                "backend wandb: %d record(s) dropped after wandb.init failed, %d dropped "
                "for arriving out of step order",
                self.dropped,
                self.out_of_order,
            )
        super().close()


def _named_dir(init_kwargs: Mapping[str, Any]) -> str | None:
    """The folder W&B writes under as the user named it (``dir=``, else ``$WANDB_DIR``);
    None if neither is set, and the handler passes its ``log_dir`` as ``dir=``."""
    if "dir" in init_kwargs:
        return str(init_kwargs["dir"])
    return os.environ.get("WANDB_DIR")


def _new_run_id(given: str | None, taken: Iterable[str]) -> str:
    """The user's run id (``id=`` or ``WANDB_RUN_ID``) if no job has it yet, else a new one."""
    given = given or os.environ.get("WANDB_RUN_ID")
    return str(given) if given and given not in taken else uuid.uuid4().hex[:12]


def _job_key(job: str | None) -> str:
    return "" if job is None else str(job)

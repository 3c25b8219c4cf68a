"""``TensorBoardHandler``: InstructLab's TensorBoard backend, written without torch.

Events go through the ``tensorboard`` package's own pieces: its ``EventFileWriter`` (the
tfevents file, flushed on a timer and on close), ``Summary``/``Event`` protos, the text
plugin's ``text_pb`` and the HParams plugin's ``hparams_pb``. So the collector needs
``tensorboard`` but not torch or TensorFlow.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ranklog.backends.arguments import reject_unknown
from ranklog.backends.owned_files import OwnedFiles, cut_back
from ranklog.backends.protocol import follow_job, job_of
from ranklog.flatten import flatten_dict
from ranklog.reporting import ReportOnce
from ranklog.run_name import job_suffix, path_inside, run_name_for

_log = logging.getLogger(__name__)
#: How many jobs' run folders a checkpoint remembers (a job seen again after more than
#: this many others gets a new folder).
_JOBS_KEPT = 1000


def _hparam_value(value: Any) -> bool | int | float | str:
    # The HParams plugin takes bool, number or string; show anything else as text.
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _quiet_writer_thread_errors() -> None:
    """Leave out the traceback Python prints when TensorBoard's writer thread dies of a
    write error (a full disk): that thread keeps the error and raises it again at the next
    write or flush, to the handler's caller, which reports it in one line."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "ranklog_quiet", False):
        return

    def hook(args: Any) -> None:
        if not (
            isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)
        ):
            previous(args)

    hook.ranklog_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _has_events(run_dir: Path) -> bool:
    return any(run_dir.glob("events.out.tfevents.*"))


class TensorBoardHandler(logging.Handler):
    """Write each metrics dict to TensorBoard under ``log_dir/<run_name>``.

    Numbers (and strings that parse as numbers) become scalars, other strings become text,
    and a record logged with ``extra={"hparams": True}`` becomes hyper-parameters that the
    HParams dashboard shows. ``run_name`` defaults to ``{time}_rank{rank}``. Events are
    flushed every ``flush_secs`` seconds and on close.

    In the collector ``{rank}`` and ``{local_rank}`` are the rank of the records this
    handler gets: 0 under the default ``rank0`` policy, and the job's rank 0 too under a
    policy that merges ranks (``first``, ``all`` with ``rank{r}/`` keys, ``mean``, ``min``,
    ``max``, ``sum``), whichever rank's record happened to come first; so the folder's name
    does not depend on arrival order.

    One run per job: records carry their job's run id (``run_id``, torchrun's
    ``TORCHELASTIC_RUN_ID``), and the first record of another job closes the current run
    and starts a new folder named from ``run_name`` again, ``{time}`` being the time it
    starts (the handler's start for its first run). If that name is another job's already,
    ``_<run id>`` is added. A job seen again goes on in its own folder.

    Exactly once after a crash: it implements ``protocol.Rewindable``. Its state is every
    event file's size at a checkpoint, cut back to on restart or after a write error (the
    run goes on in a new event file in the same run folder), and each job's run folder, so
    that a restart or ``ranklog replay`` writes every job into the folder it had.

    >>> handler = TensorBoardHandler(run_name="exp1", log_dir="logs")  # doctest: +SKIP
    >>> # later: tensorboard --logdir logs
    """

    #: Rank policy the collector puts in front of this handler unless told otherwise.
    default_rank_policy: str | None = "rank0"
    keeps_ranks_apart: bool = False
    #: State keys naming paths, which checkpoints keep relative to the output dir.
    checkpoint_paths: tuple[str, ...] = ("runs",)

    def __init__(
        self,
        level: int | str = logging.INFO,
        run_name: str | None = None,
        log_dir: str | os.PathLike[str] = "logs",
        *,
        flush_secs: float = 2.0,
        max_queue: int = 1000,
        filename_suffix: str = "",
        **tboard_init_kwargs: Any,
    ) -> None:
        reject_unknown(
            type(self).__name__, tboard_init_kwargs, "flush_secs, max_queue or filename_suffix"
        )
        super().__init__(level)
        self.log_dir = Path(log_dir)
        self.run_name = run_name
        self.flush_secs = flush_secs
        self.max_queue = max_queue
        self.filename_suffix = filename_suffix
        self.run_dir: Path | None = None
        self._started = datetime.now()
        self._writer: Any = None
        self._warn_once = ReportOnce(_log)
        # The job the writer writes (see follow_job), and each job's run folder
        # (checkpointed).
        self.job: object = None
        self._runs: dict[str, str] = {}
        # Crash recovery, driven by the collector: a run folder from a checkpoint older than
        # jobs, whether to empty each run folder when first opened (a rebuild), the folders
        # opened, and the event files opened (told to the collector once they exist).
        self._unclaimed: Path | None = None
        self._empty_first = False
        self._opened_dirs: set[Path] = set()
        self.owned_files = OwnedFiles()

    def start_job(self, job: str | None, first: logging.LogRecord) -> None:
        """The next job: the last one's run is complete; ``first`` opens this one's."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _open_run(self, record: logging.LogRecord, job: str | None) -> Any:
        """The writer for ``record``'s job: its run folder, a new event file in it."""
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:
            raise RuntimeError(
                "TensorBoardHandler needs the tensorboard package: pip install 'ranklog[collector]'"
            ) from exc
        _quiet_writer_thread_errors()
        self.run_dir = self._run_dir_for(record, job)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._empty_first and self.run_dir not in self._opened_dirs:
            for old in self.run_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self._opened_dirs.add(self.run_dir)
        self._writer = EventFileWriter(
            str(self.run_dir),
            max_queue_size=self.max_queue,
            flush_secs=self.flush_secs,
            filename_suffix=self.filename_suffix,
        )
        self.owned_files.opened(self._event_file())
        return self._writer

    def _run_dir_for(self, record: logging.LogRecord, job: str | None) -> Path:
        key = "" if job is None else str(job)
        known = self._runs.get(key)
        if known is not None:
            return Path(known)
        if self._unclaimed is not None:
            path, self._unclaimed = self._unclaimed, None
        else:
            now = self._started if self.run_dir is None else datetime.now()
            name = run_name_for(self.run_name, record, now=now)
            path = path_inside(self.log_dir, name)
            taken = {Path(other) for other in self._runs.values()}
            # A folder holding events no job here claims is an earlier job's (its checkpoint
            # lost); not for a rebuild, nor in a training process (no job: the seed's way).
            reuse = self._empty_first or job is None
            for n in itertools.count(1):
                if path not in taken and (reuse or not _has_events(path)):
                    break
                path = path_inside(self.log_dir, name + job_suffix(job) + f"_{n}" * (n > 1))
        self._runs[key] = str(path)
        if len(self._runs) > _JOBS_KEPT:
            del self._runs[next(iter(self._runs))]
        # A new job's folder is checkpointed before its event file exists (as W&B's run
        # before wandb.init): killed once the file exists but before the next checkpoint, a
        # restart would take the folder, its file holding only a header, for an earlier
        # job's and write to <name>_<job>.
        self.owned_files.opened()
        return path

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, Mapping):
            self._warn_once(
                "not-a-mapping",
                "TensorBoardHandler expected a mapping, got %s; skipping. Add IsMappingFilter "
                "to this handler.",
                type(record.msg).__name__,
            )
            return
        try:
            follow_job(self, record)
            writer = self._writer or self._open_run(record, job_of(record))
            summary = self._summary(record, record.msg)
            if summary is None:
                return
            from tensorboard.compat.proto.event_pb2 import Event

            step = getattr(record, "step", None)
            writer.add_event(Event(wall_time=record.created, step=step or 0, summary=summary))
        except Exception:
            self.handleError(record)

    def _summary(self, record: logging.LogRecord, msg: Mapping[str, Any]) -> Any:
        from tensorboard.compat.proto.summary_pb2 import Summary

        flat = flatten_dict(msg)
        if getattr(record, "hparams", False):
            from tensorboard.plugins.hparams.summary_v2 import hparams_pb

            hparams = {key: _hparam_value(value) for key, value in flat.items()}
            return hparams_pb(hparams, start_time_secs=record.created)

        from tensorboard.plugins.text.summary_v2 import text_pb

        summary = Summary()
        for key, value in flat.items():
            try:
                number = float(value)
            except ValueError:  # a string that is not a number, e.g. "3.2.3": text
                summary.value.append(text_pb(key, str(value)).value[0])
            except TypeError:
                self._warn_once(
                    key,
                    "TensorBoardHandler: %r is a %s, not a number or text; skipping it",
                    key,
                    type(value).__name__,
                )
            else:
                summary.value.add(tag=key, simple_value=number)
        return summary if summary.value else None

    def checkpoint(self) -> dict[str, Any]:
        """Flush; return each event file's size (what a restart may cut it back to; a past
        job's file is complete) and each job's run folder."""
        if self._writer is not None:
            self._writer.flush()
        opened = self.owned_files.opened_at
        files = {path: os.path.getsize(path) for path in opened if os.path.exists(path)}
        return {"files": files, "runs": dict(self._runs)}

    def restore(self, state: dict[str, Any] | None, *, from_start: bool = False) -> None:
        """Cut event files written before a crash back to their checkpointed sizes (whole
        events) and write each job on into its run folder; ``from_start``: empty each run
        folder when it is first written again."""
        state = state or {}
        for path, size in state.get("files", {}).items():
            if os.path.exists(path) and os.path.getsize(path) > size:
                os.truncate(path, 0 if from_start else size)
            self._unclaimed = Path(path).parent
        self._runs = dict(state.get("runs", {}))
        if self._runs:  # else a checkpoint from before jobs: its folder is the next job's
            self._unclaimed = None
        self._empty_first = from_start

    def _event_file(self) -> str:
        # EventFileWriter keeps its file's name private; each process writes a file of its own.
        return str(self._writer._file_name)

    def rewind_to(self, state: dict[str, Any] | None) -> None:
        """Drop the writer (and what it has not written), cut every event file back to
        ``state`` (one opened since: to its size then); the next record opens a new event
        file in its job's run folder."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # a full disk: whatever it wrote is cut below
                writer.close()
        cut_back(self.owned_files.sizes_at(state))

    def flush(self) -> None:
        """Write buffered events to the event file now."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        super().close()

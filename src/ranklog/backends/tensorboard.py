"""``TensorBoardHandler``: InstructLab's TensorBoard backend, written without torch.

Events go through the ``tensorboard`` package's own pieces: its ``EventFileWriter`` (the
tfevents file, flushed on a timer and on close), ``Summary``/``Event`` protos, the text
plugin's ``text_pb`` and the HParams plugin's ``hparams_pb``. So the collector needs
``tensorboard`` but not torch or TensorFlow.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ranklog.backends.arguments import reject_unknown
from ranklog.flatten import flatten_dict
from ranklog.reporting import ReportOnce
from ranklog.run_name import path_inside, run_name_for

_log = logging.getLogger(__name__)


def _hparam_value(value: Any) -> bool | int | float | str:
    # The HParams plugin takes bool, number or string; show anything else as text.
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


class TensorBoardHandler(logging.Handler):
    """Write each metrics dict to TensorBoard under ``log_dir/<run_name>``.

    Numbers (and strings that parse as numbers) become scalars, other strings become text,
    and a record logged with ``extra={"hparams": True}`` becomes hyper-parameters that the
    HParams dashboard shows. ``run_name`` defaults to ``{time}_rank{rank}``; in the collector
    ``{rank}`` is the rank of the first record this handler sees (rank 0 under the default
    ``rank0`` policy). Events are flushed every ``flush_secs`` seconds and on close.

    Exactly once after a crash: it implements ``protocol.Rewindable`` (the event file's size
    at a checkpoint, cut back to on restart or after a write error; the run goes on in a new
    event file in the same run folder).

    >>> handler = TensorBoardHandler(run_name="exp1", log_dir="logs")  # doctest: +SKIP
    >>> # later: tensorboard --logdir logs
    """

    #: Rank policy the collector puts in front of this handler unless told otherwise.
    default_rank_policy: str | None = "rank0"
    keeps_ranks_apart: bool = False

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
        # Crash recovery, driven by the collector's runner: the run folder to keep writing
        # into after a restart or rewind, whether to start it empty, each event file's size
        # when opened, and a hook to call once a new event file exists.
        self._resume_dir: Path | None = None
        self._start_empty = False
        self._opened_at: dict[str, int] = {}
        self.on_new_file: Callable[[], None] | None = None
        # In the collector a write error (a full disk) must reach the runner, which rewinds.
        self.raise_os_errors = False

    def _setup(self, record: logging.LogRecord) -> Any:
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:
            raise RuntimeError(
                "TensorBoardHandler needs the tensorboard package: pip install 'ranklog[collector]'"
            ) from exc
        self.run_dir = self._resume_dir or path_inside(
            self.log_dir, run_name_for(self.run_name, record, now=self._started)
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._start_empty:
            for old in self.run_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self._writer = EventFileWriter(
            str(self.run_dir),
            max_queue_size=self.max_queue,
            flush_secs=self.flush_secs,
            filename_suffix=self.filename_suffix,
        )
        path = self._event_file()
        self._opened_at.setdefault(path, os.path.getsize(path))
        if self.on_new_file is not None:
            self.on_new_file()
        return self._writer

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
            writer = self._writer or self._setup(record)
            summary = self._summary(record, record.msg)
            if summary is None:
                return
            from tensorboard.compat.proto.event_pb2 import Event

            step = getattr(record, "step", None)
            writer.add_event(Event(wall_time=record.created, step=step or 0, summary=summary))
        except OSError:
            if self.raise_os_errors:
                raise
            self.handleError(record)
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
        """Flush; return the event file's size: what a restart may cut it back to."""
        if self._writer is None:
            return {"files": {}}
        self._writer.flush()
        path = self._event_file()
        return {"files": {path: os.path.getsize(path)}}

    def restore(self, state: dict[str, Any] | None, *, from_start: bool = False) -> None:
        """Cut event files written before a crash back to their checkpointed sizes (whole
        events) and keep writing the same run; ``from_start``: start that run empty."""
        for path, size in (state or {}).get("files", {}).items():
            if os.path.exists(path) and os.path.getsize(path) > size:
                os.truncate(path, 0 if from_start else size)
            self._resume_dir = Path(path).parent
        self._start_empty = from_start

    def _event_file(self) -> str:
        # EventFileWriter keeps its file's name private; each process writes a file of its own.
        return str(self._writer._file_name)

    def rewind_to(self, state: dict[str, Any] | None) -> None:
        """Drop the writer (and what it has not written), cut every event file back to
        ``state`` (one opened since: to its size then); the next record opens a new event
        file in the same run folder."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # a full disk: whatever it wrote is cut below
                writer.close()
        sizes = {**self._opened_at, **(state or {}).get("files", {})}
        for path, size in sizes.items():
            if os.path.exists(path) and os.path.getsize(path) > size:
                os.truncate(path, size)
        self._resume_dir = self.run_dir
        self._start_empty = False

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

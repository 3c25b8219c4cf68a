"""Each backend handler behind its own bounded queue and thread.

The collector's receive loop only enqueues; a slow or hung backend fills its own queue and
never delays the loop or other backends. A backend whose queue is full falls behind: it
stops taking records from the loop and, once its queue is empty, catches up by reading
the journal on disk, so memory stays bounded whatever the backends do.
A backend's rank policy (see ``_policy.py``) runs on that same thread, in front of it.

Each backend keeps a checkpoint (``.ranklog/backend-<name>.json``): the journal offset it
has written through and, for handlers that append to files, those files' sizes then. After
a crash the files are cut back to those sizes and the journal is replayed from that offset,
so nothing is written twice or lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ranklog._codec import RECORD, decode
from ranklog._errors import ProtocolError
from ranklog._journal import Journal
from ranklog._policy import RankPolicy
from ranklog._records import OFFSET_ATTR, build_record, reaches

_log = logging.getLogger("ranklog.collector")
_STOP = object()
_RETRY_AFTER = 1.0
DEFAULT_QUEUE_SIZE = 10_000


def _copy(record: logging.LogRecord) -> logging.LogRecord:
    """A shallow copy (a fraction of ``makeLogRecord``'s cost: no __init__ runs)."""
    copy = logging.LogRecord.__new__(logging.LogRecord)
    copy.__dict__ = record.__dict__.copy()
    return copy


class _Rewound(Exception):
    """The backend hit a write error and went back to its last checkpoint."""


class QueuedHandler(logging.Handler):
    """Wraps ``inner`` so that its ``handle`` (and ``policy``, if any) runs on a thread of
    its own."""

    def __init__(
        self,
        inner: logging.Handler,
        *,
        maxsize: int = DEFAULT_QUEUE_SIZE,
        name: str = "",
        policy: RankPolicy | None = None,
    ) -> None:
        super().__init__(logging.NOTSET)
        self.inner = inner
        self.name = name or inner.get_name() or type(inner).__name__
        self.policy = policy
        self.failed = 0
        self.abandoned = False
        self._closing = threading.Event()
        self._closed_cleanly = False
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        # Journal bookkeeping, set by attach_journal before any record arrives.
        self.resume_offset = 0
        self.checkpoint_interval = 1.0
        self._journal: Journal | None = None
        self._checkpoint_path: Path | None = None
        self._handled_offset = 0
        self._next_checkpoint = 0.0
        self._enqueued_end = 0
        self._lag_lock = threading.Lock()
        self._lag_from: int | None = None
        self._lag_to = 0
        self._last_checkpoint: dict[str, Any] | None = None
        self._retry_at = 0.0
        self._write_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"backend-{self.name}", daemon=True)
        self._thread.start()

    def attach_journal(
        self, journal: Journal, state_dir: Path, *, from_start: bool = False
    ) -> None:
        """Resume from this backend's checkpoint (or from the journal's start)."""
        self._journal = journal
        self._checkpoint_path = state_dir / f"backend-{self.name}.json"
        saved: dict[str, Any] = {"offset": 0}
        if self._checkpoint_path.exists():
            saved = json.loads(self._checkpoint_path.read_text())
        restore = getattr(self.inner, "restore", None)
        if restore is not None:
            # A backend that writes asynchronously may know better how far it really got.
            earlier = restore(saved.get("backend"), from_start=from_start)
            if earlier is not None:
                saved["offset"] = min(int(saved["offset"]), earlier)
        if self.policy is not None and not from_start:
            self.policy.restore(saved.get("policy"))
        if from_start:
            saved = {"offset": 0}
        if hasattr(self.inner, "rewind_to") and hasattr(self.inner, "raise_os_errors"):
            self.inner.raise_os_errors = True  # write errors come back here, see _rewind
        self._last_checkpoint = saved
        if hasattr(self.inner, "on_new_file"):
            self.inner.on_new_file = self._write_checkpoint
        self.resume_offset = self._handled_offset = self._enqueued_end = int(saved["offset"])

    def handle(self, record: logging.LogRecord) -> bool:
        offset: int = getattr(record, OFFSET_ATTR)  # every record the collector dispatches has one
        if offset <= self.resume_offset:
            return False  # written before a restart
        with self._lag_lock:
            if self._lag_from is not None:
                self._lag_to = offset  # the journal has it; caught up later
                return False
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self._lag_from, self._lag_to = self._enqueued_end, offset
                _log.warning(
                    "backend %s is falling behind; it will catch up from the journal", self.name
                )
                return False
            self._enqueued_end = offset
        return True

    def _lagged_records(self) -> Iterator[logging.LogRecord]:
        """Records this backend skipped while its queue was full, read back from the journal."""
        assert self._journal is not None
        while True:
            with self._lag_lock:
                start, stop = self._lag_from, self._lag_to
                if start is None or start >= stop:
                    self._lag_from = None  # caught up: take records from the loop again
                    self._enqueued_end = max(self._enqueued_end, stop)
                    return
            for _, end, frame in self._journal.read(start, stop):
                with self._lag_lock:
                    self._lag_from = end
                try:
                    envelope = decode(frame)
                except ProtocolError:
                    continue
                if envelope["kind"] != RECORD:
                    continue
                record = build_record(envelope, end)
                if reaches(self, record):
                    yield record
            with self._lag_lock:
                if self._lag_from == start:  # the journal held nothing more: stop waiting
                    self._lag_from = stop

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() bypasses it
        self.handle(record)

    def _wait(self) -> float | None:
        if self._closing.is_set():
            return 0.05  # a full queue may hold no room for _STOP: notice the request anyway
        deadline = self.policy.next_deadline() if self.policy is not None else None
        if self._journal is not None:
            wake = max(self._next_checkpoint, self._retry_at)
            deadline = min(deadline or wake, wake)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._wait())
            except queue.Empty:
                if self._closing.is_set():
                    break
                if self.policy is not None:
                    self._deliver(self._policy_step(self.policy.due, time.monotonic()))
                self._catch_up_and_checkpoint()
                continue
            if item is _STOP:
                break
            with contextlib.suppress(_Rewound):
                self._take(item)
            if time.monotonic() >= self._next_checkpoint or (
                self._lag_from is not None and self._queue.empty()
            ):
                self._catch_up_and_checkpoint()
        self._retry_at = 0.0
        self._catch_up_and_checkpoint()
        self._finish()

    def _take(self, record: logging.LogRecord) -> None:
        if self.policy is None:
            self._deliver([record])
        else:
            self._deliver(self._policy_step(self.policy.accept, record, time.monotonic()))
        self._handled_offset = max(self._handled_offset, getattr(record, OFFSET_ATTR, 0))

    def _catch_up_and_checkpoint(self) -> None:
        if self._journal is None:
            return
        with contextlib.suppress(_Rewound):
            now = time.monotonic()
            if self._lag_from is not None and self._queue.empty() and now >= self._retry_at:
                for record in self._lagged_records():
                    self._take(record)
            if time.monotonic() >= self._next_checkpoint:
                try:
                    self._write_checkpoint()
                except OSError as exc:
                    if self._can_rewind():
                        self._rewind(exc)
                    self._failure("could not write its checkpoint")

    def _rewind(self, error: OSError) -> None:
        """A write failed (a full disk): go back to the last checkpoint and, after a pause,
        replay from the journal. Nothing is lost and nothing is written twice."""
        assert self._last_checkpoint is not None
        saved = self._last_checkpoint
        reason = f"{type(error).__name__}: {error.strerror or error}"
        if self._write_error is None:
            _log.error(
                "backend %s cannot write (%s); retrying from the journal every %gs",
                self.name,
                reason,
                _RETRY_AFTER,
            )
        self._write_error = reason
        with contextlib.suppress(OSError):  # if it fails, it is cut back on the next attempt
            self.inner.rewind_to(saved.get("backend"))  # type: ignore[attr-defined]
        with self._lag_lock:
            self._lag_to = max(self._lag_to, self._enqueued_end, self._handled_offset)
            self._lag_from = int(saved["offset"])
            while True:  # queued records are in the journal: the catch-up reads them again
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._closing.set()
        self._handled_offset = int(saved["offset"])
        self._retry_at = time.monotonic() + _RETRY_AFTER
        raise _Rewound from error

    def _write_checkpoint(self) -> None:
        """Flush the backend, then record how far it got (atomically).

        Also called by the backend when it opens a new file; an OSError (a full disk)
        propagates to the caller, which rewinds."""
        if self._checkpoint_path is None:
            return
        self._next_checkpoint = time.monotonic() + self.checkpoint_interval
        try:
            checkpoint = getattr(self.inner, "checkpoint", None)
            if checkpoint is None:
                self.inner.flush()
            held = self.policy.held_from() if self.policy is not None else None
            state = {
                # Records a policy still holds were not written: resume before the oldest.
                "offset": self._handled_offset if held is None else held - 1,
                "backend": checkpoint() if checkpoint is not None else None,
                "policy": self.policy.checkpoint() if self.policy is not None else None,
            }
            if state == self._last_checkpoint:
                return
            tmp = self._checkpoint_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self._checkpoint_path)
            self._last_checkpoint = state
        except OSError:
            raise
        except Exception:
            self._failure("could not write its checkpoint")
            return
        if self._write_error is not None and self._last_checkpoint is state:
            _log.warning("backend %s writes again", self.name)
            self._write_error = None

    def _can_rewind(self) -> bool:
        return (
            self._journal is not None
            and self._last_checkpoint is not None
            and getattr(self.inner, "raise_os_errors", False)
        )

    def _policy_step(self, step: Any, *args: Any) -> list[logging.LogRecord]:
        try:
            return step(*args)  # type: ignore[no-any-return]
        except Exception:
            self._failure("its rank policy failed on a record")
            return []

    def _deliver(self, records: list[logging.LogRecord]) -> None:
        for record in records:
            try:
                # Its own copy: every backend thread shares the record, and a filter may
                # rewrite it (FormatDictFilter turns msg into text) under the others.
                self.inner.handle(_copy(record))
            except OSError as exc:
                if self._can_rewind():
                    self._rewind(exc)
                self._failure("failed on a record")
            except Exception:
                self._failure("failed on a record")

    def _failure(self, what: str) -> None:
        self.failed += 1
        if self.failed == 1:
            _log.exception("backend %s %s; it keeps running", self.name, what)

    def _finish(self) -> None:
        # Closing on this thread, not the caller's: an SDK that hangs in close (a W&B
        # finish that cannot reach its server) must not hold up the collector's shutdown.
        if self.policy is not None:
            self._deliver(self._policy_step(self.policy.drain))
        self._next_checkpoint = 0.0
        self._catch_up_and_checkpoint()
        try:
            self.inner.flush()
            self.inner.close()
        except Exception:
            _log.exception("backend %s failed to close", self.name)
            return
        self._closed_cleanly = True

    def request_close(self) -> None:
        """Ask the backend to drain and close, without waiting (see :meth:`close_within`)."""
        if not self._closing.is_set():
            self._closing.set()
            # With the queue full, the thread sees _closing once it has worked it down.
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)

    def close_within(self, deadline: float) -> bool:
        """Drain, then close the backend; abandon it if the deadline passes first.

        Call :meth:`request_close` on every backend first so that they all drain at once.
        """
        self.request_close()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.abandoned = True
            _log.error(
                "backend %s did not drain within the drain bound; abandoning it with %d "
                "record(s) queued",
                self.name,
                self._queue.qsize(),
            )
            return False
        return self._closed_cleanly

    def close(self) -> None:
        # Closing goes through close_within(); logging.shutdown() must not block on a backend.
        super().close()

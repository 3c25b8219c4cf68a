"""One backend's checkpoints: resume from one, write one, add a new file to the last one,
and go back to it after a write error. The file format is ``checkpoint.py``'s; the file is
``.ranklog/backend-<name>.json`` (:func:`ranklog.pipe.checkpoint_path`).

A :class:`Checkpoints` works on its backend's :class:`~.sink.Sink` (the handler's state) and
returns what the feed needs: an offset to read from, a write error. It never calls the feed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ranklog.backends import checkpoint as _file
from ranklog.backends.policies import RankPolicy
from ranklog.backends.sink import Sink
from ranklog.journal import first_offset
from ranklog.pipe import checkpoint_path

_log = logging.getLogger(__name__)


class Checkpoints:
    """The checkpoints of ``sink``'s backend, every ``interval`` seconds by ``clock``.

    ``has_policy``: a rank policy is in front of the handler, so each checkpoint keeps the
    policy's state and the earlier positions it may go back to.
    """

    def __init__(self, sink: Sink, *, has_policy: bool, clock: Callable[[], float]) -> None:
        self.sink = sink
        self.has_policy = has_policy
        self.clock = clock
        self.interval = 1.0
        self.path: Path | None = None  # None: replaying, no checkpoints
        #: The last checkpoint written (or resumed from): what a rewind goes back to.
        self.last: dict[str, Any] | None = None
        self.next_due = 0.0
        self._write_error: str | None = None
        if sink.resumable is not None:
            sink.resumable.owned_files.on_open = self.new_file

    def resume(self, journal: Path, state_dir: Path, *, from_start: bool = False) -> int:
        """Go back to the checkpoint in ``state_dir`` (or to the journal's start): restore
        the handler's state; return the journal offset to read on from."""
        self.path = checkpoint_path(state_dir, self.sink.name)
        saved = _file.load(self.path, self.sink.name, self.sink.checkpoint_paths)
        lost = None if saved is None else _file.shortened_file(saved.get("backend"))
        if saved is None or lost is not None:
            # The checkpoint promised more than the files hold (a machine crash before the
            # page cache reached the disk), or cannot be read: only a rebuild from the
            # journal is known to be exact.
            _log.warning(
                "backend %s: %s; rebuilding the backend from the journal",
                self.sink.name,
                f"{lost} is shorter than at its last checkpoint" if lost else "no checkpoint",
            )
            from_start = True
        saved = saved or {"offset": 0}
        resumable = self.sink.resumable
        if resumable is not None:
            # A backend that writes asynchronously may know better how far it really got.
            earlier = resumable.restore(saved.get("backend"), from_start=from_start)
            if earlier is not None and earlier < int(saved["offset"]):
                if not self.has_policy:
                    saved["offset"] = earlier
                else:  # and the policy as it was there
                    saved["offset"], saved["policy"] = _file.policy_at(saved, earlier)
        if from_start:
            # Its files stay listed, emptied: a crash during the rebuild still cuts them back.
            saved = {"offset": 0, "backend": _file.emptied(saved.get("backend"))}
        self.last = saved
        return self._present(journal, int(saved["offset"]), from_start=from_start)

    def _present(self, journal: Path, offset: int, *, from_start: bool) -> int:
        """``offset``, or the journal's oldest segment if retention deleted it already."""
        first = first_offset(journal)
        if offset < first:
            _log.warning(
                "backend %s: %.1f MiB of journal before offset %d were already deleted "
                "(--journal-retention); %s from there",
                self.sink.name,
                (first - offset) / (1 << 20),
                first,
                "rebuilding" if from_start else "reading on",
            )
        return max(offset, first)

    def needed_from(self, offset: int) -> int:
        """The lowest journal offset the backend may read again (it is at ``offset``)."""
        return offset if self.last is None else _file.needed_from(self.last)

    def write(self, offset: int, policy: RankPolicy | None) -> OSError | None:
        """Flush the backend, then record that it read through ``offset`` (atomically);
        the write error (a full disk) if one stopped it."""
        if self.path is None:
            return None
        self.next_due = self.clock() + self.interval
        resumable = self.sink.resumable
        try:
            if resumable is None:
                self.sink.handler.flush()
            backend = None if resumable is None else resumable.checkpoint()
            state = _file.next_state(self.last, offset, backend, policy)
            if state == self.last:
                return None
            _file.save(self.path, state, self.sink.checkpoint_paths)
            self.last = state
        except OSError as exc:
            return exc
        except Exception:
            self.sink.failure("could not write its checkpoint")
            return None
        if self._write_error is not None:
            _log.warning("backend %s writes again", self.sink.name)
            self._write_error = None
        return None

    def postpone(self) -> None:
        """Nothing new to record (waiting to retry): the next checkpoint after the interval."""
        self.next_due = self.clock() + self.interval

    def can_rewind(self) -> bool:
        return self.last is not None and self.sink.rewindable is not None

    def rewind(self, error: OSError, retry_after: float) -> int:
        """A write failed (a full disk): cut the backend back to the last checkpoint, and
        return its offset, to read the journal again from there after ``retry_after`` s."""
        assert self.last is not None and self.sink.rewindable is not None
        reason = f"{type(error).__name__}: {error.strerror or error}"
        if self._write_error is None:
            _log.error(
                "backend %s cannot write %s (%s); retrying from the journal every %gs",
                self.sink.name,
                self.sink.where(error),
                reason,
                retry_after,
            )
        self._write_error = reason
        with contextlib.suppress(OSError):  # if it fails, it is cut back on the next attempt
            self.sink.rewindable.rewind_to(self.last.get("backend"))
        return int(self.last["offset"])

    def new_file(self) -> None:
        """The backend opened a file (before writing to it), or a W&B run: add it to the
        last checkpoint, so that a restart cuts it back (resumes it) too.

        Position, policy state and the other files stay as they were checkpointed: this runs
        in the middle of handing on records (a policy may have emitted more than is written
        yet), so only the last checkpoint is known to be consistent."""
        if self.path is None or self.sink.resumable is None:
            return  # replaying without checkpoints
        last = self.last or {"offset": 0}
        now = self.sink.resumable.checkpoint()
        backend = _file.merged(last.get("backend"), now, opened=True)
        state = {**last, "backend": backend}
        _file.save(self.path, state, self.sink.checkpoint_paths)
        self.last = state

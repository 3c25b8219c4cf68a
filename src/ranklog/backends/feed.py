"""One backend fed the journal's records, step by step: its route, rank policy, handler,
checkpoints and rewinds, with time from an injected clock and no thread of its own.

Each backend keeps a checkpoint (``.ranklog/backend-<name>.json``, see ``checkpoint.py``):
the journal offset it has written through and, for a :class:`~.protocol.Resumable` handler,
its own state (the files it owns and their sizes then). After a crash the files are cut
back to those sizes and the backend reads on from that offset, so nothing is written twice
or lost. The thread that drives a feed in the backends' process is ``runner.py``;
:func:`replay` drives one on the caller's thread, so tests call the same logic directly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ranklog.backends import checkpoint as _checkpoint
from ranklog.backends.handing import Handing
from ranklog.backends.policies import RankPolicy
from ranklog.backends.protocol import Resumable, Rewindable
from ranklog.backends.route import Route
from ranklog.journal import DamageReport, first_offset, read_entries
from ranklog.reporting import ReportOnce

_log = logging.getLogger(__name__)
_RETRY_AFTER = 1.0
_CHUNK_ENTRIES = 4096  # entries read between looks at checkpoints and policy deadlines
_BEHIND_WARNING_BYTES = 8 << 20
_BEHIND_WARNING_EVERY = 30.0

Clock = Callable[[], float]


class _Rewound(Exception):
    """The backend hit a write error and went back to its last checkpoint."""


class BackendFeed(Handing):
    """Feeds ``handler`` (behind a rank policy, if any) the journal's records that ``route``
    says it gets, and checkpoints how far it got.

    ``policy`` makes a fresh policy: one is made again, from the checkpoint, whenever the
    backend goes back to it (a restart, a rewind). ``clock`` gives monotonic seconds: policy
    deadlines, checkpoints and retries follow it.
    """

    def __init__(
        self,
        handler: logging.Handler,
        route: Route,
        *,
        name: str = "",
        policy: Callable[[], RankPolicy] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.handler = handler
        self.route = route
        self.name = name or handler.get_name() or type(handler).__name__
        self.clock = clock
        self._resumable = handler if isinstance(handler, Resumable) else None
        self._rewindable = handler if isinstance(handler, Rewindable) else None
        if self._rewindable is not None:
            self._rewindable.raise_os_errors = True  # write errors come back here: _rewind
        if self._resumable is not None:
            self._resumable.on_new_file = self._register_new_file
        self._new_policy = policy
        # The keys of the handler's state that name paths: kept relative to the output dir.
        self._paths: tuple[str, ...] = getattr(handler, "checkpoint_paths", ())
        # Made once now so that a bad policy fails the configuration, not the first record;
        # it is made again from the checkpoint before use.
        self.policy = policy() if policy is not None else None
        self._resume_pending = False  # the policy must be rebuilt from the last checkpoint
        self.report = ReportOnce(_log, logging.ERROR)
        self.offset = 0  # journal position read through
        self.checkpoint_interval = 1.0
        self._journal_path: Path | None = None
        self._checkpoint_path: Path | None = None
        self._last_checkpoint: dict[str, Any] | None = None
        self._next_checkpoint = 0.0
        self._retry_at = 0.0
        self._write_error: str | None = None
        self._next_behind_warning = 0.0
        self._unreadable_at: int | None = None
        self._damage = DamageReport(f"backend {self.name}", _log)

    @property
    def failed(self) -> int:
        """Records (and other steps) the backend or its policy failed on."""
        return self.report.total()

    def resume(self, journal: Path, state_dir: Path | None, *, from_start: bool = False) -> None:
        """Go back to this backend's checkpoint in ``state_dir`` (or to the journal's start):
        its offset, its handler's state, its policy. ``state_dir`` None: no checkpoints."""
        self._journal_path = journal
        if state_dir is None:
            self.offset, self._resume_pending = 0, False
            return
        self._checkpoint_path = state_dir / f"backend-{self.name}.json"
        saved = _checkpoint.load(self._checkpoint_path, str(self.name), self._paths)
        lost = None if saved is None else _checkpoint.shortened_file(saved.get("backend"))
        if saved is None or lost is not None:
            # The checkpoint promised more than the files hold (a machine crash before the
            # page cache reached the disk), or cannot be read: only a rebuild from the
            # journal is known to be exact.
            _log.warning(
                "backend %s: %s; rebuilding the backend from the journal",
                self.name,
                f"{lost} is shorter than at its last checkpoint" if lost else "no checkpoint",
            )
            from_start = True
        saved = saved or {"offset": 0}
        if self._resumable is not None:
            # A backend that writes asynchronously may know better how far it really got.
            earlier = self._resumable.restore(saved.get("backend"), from_start=from_start)
            if earlier is not None and earlier < int(saved["offset"]):
                if self._new_policy is None:
                    saved["offset"] = earlier
                else:  # and the policy as it was there
                    saved["offset"], saved["policy"] = _checkpoint.policy_at(saved, earlier)
        if from_start:
            # Its files stay listed, emptied: a crash during the rebuild still cuts them back.
            saved = {"offset": 0, "backend": _checkpoint.emptied(saved.get("backend"))}
        self._last_checkpoint = saved
        self.offset = self._present(journal, int(saved["offset"]), from_start=from_start)
        self._resume_pending = self._new_policy is not None

    def _present(self, journal: Path, offset: int, *, from_start: bool) -> int:
        """``offset``, or the journal's oldest segment if retention deleted it already."""
        first = first_offset(journal)
        if offset < first:
            _log.warning(
                "backend %s: %.1f MiB of journal before offset %d were already deleted "
                "(--journal-retention); %s from there",
                self.name,
                (first - offset) / (1 << 20),
                first,
                "rebuilding" if from_start else "reading on",
            )
        return max(offset, first)

    def needed_from(self) -> int:
        """The lowest journal offset this backend may read again: none before it is needed."""
        saved = self._last_checkpoint
        return self.offset if saved is None else _checkpoint.needed_from(saved)

    # -- one step of work, on whichever thread runs it ------------------------------------

    def step(self, end: int) -> bool:
        """Do what is due by the clock: rebuild the policy, hand on what its deadlines
        release, read the journal on towards ``end`` (a chunk), checkpoint. False if a bug
        escaped (it is reported; the caller should pause before the next step)."""
        now = self.clock()
        try:
            if self._resume_pending and now >= self._retry_at:
                self._resume_policy()
            if self.policy is not None and not self._resume_pending:
                self._deliver(self._policy_step(self.policy.due, now))
            if self.offset < end and now >= self._retry_at:
                self._follow(end, now)
            if self.clock() >= self._next_checkpoint:
                self._checkpoint_or_rewind()
        except _Rewound:
            pass
        except Exception:  # a bug must cost a record, never the backend
            self._failure("failed")
            return False
        return True

    def next_due(self) -> float:
        """When, by the clock, :meth:`step` next has more to do than read new entries: a
        checkpoint, a retry, a policy deadline."""
        wake = max(self._next_checkpoint, self._retry_at)
        policy = None if self._resume_pending else self.policy  # a stale one's deadlines
        deadline = policy.next_deadline() if policy is not None else None
        return wake if deadline is None else min(wake, deadline)

    @property
    def retry_at(self) -> float:
        """No reading before this time (after a write error or an unreadable entry)."""
        return self._retry_at

    def run_until(self, end: int) -> None:
        """Step until the journal is read to ``end``, or until a retry must wait for the
        clock (a write error, an unreadable entry). Never waits or sleeps."""
        self.step(end)
        while self.offset < end and self.clock() >= self.retry_at:
            before = self.offset
            if not self.step(end) and self.offset == before:
                break

    def finish(self) -> bool:
        """Hand on what the policy holds, checkpoint, flush and close the handler. True if
        all of it was written and checkpointed."""
        settled = False
        try:
            if self._resume_pending:
                self._resume_policy()
            if self.policy is not None:
                self._deliver(self._policy_step(self.policy.drain))
            self._write_checkpoint()
            settled = True
        except _Rewound:
            pass  # what is not written stays in the journal: the next start writes it
        except OSError as exc:
            with contextlib.suppress(_Rewound):
                if self._can_rewind():
                    self._rewind(exc)
            self._failure("could not write its last checkpoint", exc)
        try:
            self.handler.flush()
            self.handler.close()
        except OSError as exc:  # a full disk: one line, as for any write error
            _log.error(
                "backend %s could not close %s (%s)",
                self.name,
                _where(exc, self.handler),
                exc.strerror or exc,
            )
            return False
        except Exception:
            _log.exception("backend %s failed to close", self.name)
            return False
        return settled

    def _resume_policy(self) -> None:
        """Make the policy again as it was at the last checkpoint: its own state, the records
        it held then (taken again, in order), and the records before the checkpoint it must
        remember (``first``: the steps it has seen; shown again, nothing handed on)."""
        assert self._new_policy is not None and self._journal_path is not None
        saved = (self._last_checkpoint or {}).get("policy") or {}
        policy = self.policy = self._new_policy()
        policy.restore(saved.get("state"))
        held = set(saved.get("held", ()))
        remember = saved.get("remember_from")
        begin = min([*held, *([remember] if remember is not None else [])], default=None)
        if begin is not None:
            now = self.clock()
            entries = read_entries(self._journal_path, begin, self.offset, self._damage)
            for start, end, frame in entries:
                record = self._record(frame, start, end)
                if record is None:
                    continue
                if start in held:
                    self._deliver(self._policy_step(policy.accept, record, now))
                elif remember is not None and start >= remember:
                    self._policy_step(policy.remember, record, now)
        self._resume_pending = False

    def _follow(self, end: int, now: float) -> None:
        """Hand the next journal entries (up to ``end``) to the backend."""
        assert self._journal_path is not None
        if end - self.offset > _BEHIND_WARNING_BYTES and now >= self._next_behind_warning:
            self._next_behind_warning = now + _BEHIND_WARNING_EVERY
            _log.warning(
                "backend %s is %.0f MiB behind the journal; it catches up from disk",
                self.name,
                (end - self.offset) / (1 << 20),
            )
        entries = read_entries(self._journal_path, self.offset, end, self._damage)
        if self._hand_on(entries, _CHUNK_ENTRIES) == 0:
            # An entry below the durable end that does not read back (damaged on disk):
            # never spin on it; say so and look again now and then.
            self._retry_at = self.clock() + _RETRY_AFTER
            if self._unreadable_at != self.offset:
                self._unreadable_at = self.offset
                _log.error(
                    "backend %s: the journal does not read back at offset %d; retrying",
                    self.name,
                    self.offset,
                )

    def _failure(self, what: str, error: OSError | None = None) -> None:
        """Report a failure once; a write error as one line naming the path, without the
        traceback a bug gets."""
        if error is not None:
            what = f"{what}: cannot write {_where(error, self.handler)} ({error.strerror or error})"
        self.report(
            what, "backend %s %s; it keeps running", self.name, what, exc_info=error is None
        )

    # -- checkpoints and rewinds ----------------------------------------------------------

    def _checkpoint_or_rewind(self) -> None:
        try:
            self._write_checkpoint()
        except OSError as exc:
            if self._can_rewind():
                self._rewind(exc)
            self._failure("could not write its checkpoint", exc)

    def _can_rewind(self) -> bool:
        return self._last_checkpoint is not None and self._rewindable is not None

    def _rewind(self, error: OSError) -> None:
        """A write failed (a full disk): go back to the last checkpoint and, after a pause,
        read the journal again from there. Nothing is lost and nothing is written twice."""
        assert self._last_checkpoint is not None and self._rewindable is not None
        saved = self._last_checkpoint
        reason = f"{type(error).__name__}: {error.strerror or error}"
        if self._write_error is None:
            _log.error(
                "backend %s cannot write %s (%s); retrying from the journal every %gs",
                self.name,
                _where(error, self.handler),
                reason,
                _RETRY_AFTER,
            )
        self._write_error = reason
        with contextlib.suppress(OSError):  # if it fails, it is cut back on the next attempt
            self._rewindable.rewind_to(saved.get("backend"))
        self.offset = int(saved["offset"])
        self._resume_pending = self._new_policy is not None  # its memory is past the checkpoint
        self._retry_at = self.clock() + _RETRY_AFTER
        raise _Rewound from error

    def _write_checkpoint(self) -> None:
        """Flush the backend, then record how far it got (atomically).

        An OSError (a full disk) propagates to the caller, which rewinds."""
        if self._checkpoint_path is None:
            return
        self._next_checkpoint = self.clock() + self.checkpoint_interval
        if self._resume_pending:
            return  # back at the last checkpoint, waiting to retry: nothing new to record
        try:
            if self._resumable is None:
                self.handler.flush()
            backend = None if self._resumable is None else self._resumable.checkpoint()
            state = _checkpoint.next_state(self._last_checkpoint, self.offset, backend, self.policy)
            if state == self._last_checkpoint:
                return
            _checkpoint.save(self._checkpoint_path, state, self._paths)
            self._last_checkpoint = state
        except OSError:
            raise
        except Exception:
            self._failure("could not write its checkpoint")
            return
        if self._write_error is not None:
            _log.warning("backend %s writes again", self.name)
            self._write_error = None

    def _register_new_file(self) -> None:
        """The backend opened a file (before writing to it), or a W&B run: add it to the
        last checkpoint, so that a restart cuts it back (resumes it) too.

        Position, policy state and the other files stay as they were checkpointed: this runs
        in the middle of handing on records (a policy may have emitted more than is written
        yet), so only the last checkpoint is known to be consistent."""
        if self._checkpoint_path is None or self._resumable is None:
            return  # replaying without checkpoints
        last = self._last_checkpoint or {"offset": self.offset}
        now = self._resumable.checkpoint()
        backend = _checkpoint.merged(last.get("backend"), now, opened=True)
        state = {**last, "backend": backend}
        _checkpoint.save(self._checkpoint_path, state, self._paths)
        self._last_checkpoint = state


def _where(error: OSError, handler: logging.Handler) -> str:
    """The path a write error is about: the error's own, else the folder the handler writes."""
    return str(error.filename or getattr(handler, "log_dir", None) or "its files")


def replay(journal: Path, feed: BackendFeed, start: int, stop: int) -> BackendFeed:
    """Run ``feed`` over the journal's entries in ``[start, stop)`` on this thread, as the
    backends' process would (route, rank policy, handler, failure reports) but with no
    checkpoint read or written, and time from the feed's clock only: nothing waits.

    To go on (say after moving a fake clock past a policy's deadline), call
    :meth:`BackendFeed.run_until`; :meth:`BackendFeed.finish` drains and closes."""
    feed.resume(journal, None)
    feed.offset = start
    feed.run_until(stop)
    return feed

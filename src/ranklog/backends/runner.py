"""Each backend handler on a thread of its own, following the journal.

Records reach a backend one way only: from the journal on disk, up to the end the
collector has made durable. A slow or hung backend falls behind in the file, never in
memory, and never delays the receive loop or the other backends. A backend's rank policy
(see ``_policy.py``) runs on that same thread, in front of it.

Each backend keeps a checkpoint (``.ranklog/backend-<name>.json``): the journal offset it
has written through and, for handlers that append to files, those files' sizes then. After
a crash the files are cut back to those sizes and the backend reads on from that offset,
so nothing is written twice or lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ranklog.backends import checkpoint as _checkpoint
from ranklog.backends.policies import RankPolicy
from ranklog.backends.records import build_record, reaches
from ranklog.journal import read_entries
from ranklog.wire import RECORD, decode_journaled

_log = logging.getLogger(__name__)
_RETRY_AFTER = 1.0
_CHUNK_ENTRIES = 4096  # entries read between looks at checkpoints and policy deadlines
_BEHIND_WARNING_BYTES = 8 << 20
_BEHIND_WARNING_EVERY = 30.0
_HISTORY = 32  # earlier checkpoints kept (about as many seconds)


class _Rewound(Exception):
    """The backend hit a write error and went back to its last checkpoint."""


class JournalBackend(logging.Handler):
    """Runs ``inner`` (and a rank policy, if any) on a thread that reads the journal.

    It stands in for ``inner`` in the logger tree, so that :func:`reaches` knows which
    records ``inner`` gets; records logged in this process itself (an SDK's own warnings)
    are not metric records and are ignored. ``policy`` makes a fresh policy: one is made
    again, from the checkpoint, whenever the backend goes back to it (a restart, a rewind).
    """

    def __init__(
        self,
        inner: logging.Handler,
        *,
        name: str = "",
        policy: Callable[[], RankPolicy] | None = None,
    ) -> None:
        super().__init__(logging.NOTSET)
        self.inner = inner
        self.name = name or inner.get_name() or type(inner).__name__
        self._new_policy = policy
        # Made once now so that a bad policy fails the configuration, not the first record;
        # the backend's thread makes it again from the checkpoint before using it.
        self.policy = policy() if policy is not None else None
        self._resume_pending = False  # the policy must be rebuilt from the last checkpoint
        self.failed = 0
        self.abandoned = False
        self.offset = 0  # journal position read through
        self.checkpoint_interval = 1.0
        self._wake = threading.Condition()
        self._durable_end = 0
        self._closing = False
        self._closed_cleanly = False
        self._journal_path: Path | None = None
        self._checkpoint_path: Path | None = None
        self._last_checkpoint: dict[str, Any] | None = None
        self._next_checkpoint = 0.0
        self._retry_at = 0.0
        self._write_error: str | None = None
        self._next_behind_warning = 0.0
        self._unreadable_at: int | None = None
        self._reach_cache: dict[tuple[str, int], bool] = {}
        self._thread = threading.Thread(target=self._run, name=f"backend-{self.name}", daemon=True)

    def attach_journal(self, journal: Path, state_dir: Path, *, from_start: bool = False) -> None:
        """Resume from this backend's checkpoint (or from the journal's start), and start."""
        self._journal_path = journal
        self._checkpoint_path = state_dir / f"backend-{self.name}.json"
        saved = _checkpoint.load(self._checkpoint_path, str(self.name))
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
        restore = getattr(self.inner, "restore", None)
        if restore is not None:
            # A backend that writes asynchronously may know better how far it really got.
            earlier = restore(saved.get("backend"), from_start=from_start)
            if earlier is not None and earlier < int(saved["offset"]):
                if self._new_policy is None:
                    saved["offset"] = earlier
                else:  # and the policy as it was there
                    saved["offset"], saved["policy"] = _checkpoint.policy_at(saved, earlier)
        if from_start:
            # Its files stay listed, emptied: a crash during the rebuild still cuts them back.
            saved = {"offset": 0, "backend": _checkpoint.emptied(saved.get("backend"))}
        if hasattr(self.inner, "rewind_to") and hasattr(self.inner, "raise_os_errors"):
            self.inner.raise_os_errors = True  # write errors come back here, see _rewind
        self._last_checkpoint = saved
        if hasattr(self.inner, "on_new_file"):
            self.inner.on_new_file = self._register_new_file
        self.offset = int(saved["offset"])
        self._resume_pending = self._new_policy is not None
        self._thread.start()

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
            now = time.monotonic()
            for start, end, frame in read_entries(self._journal_path, begin, self.offset):
                record = self._record(frame, start, end)
                if record is None:
                    continue
                if start in held:
                    self._deliver(self._policy_step(policy.accept, record, now))
                elif remember is not None and start >= remember:
                    self._policy_step(policy.accept, record, now)
        self._resume_pending = False

    def advance(self, durable_end: int) -> None:
        """The journal is durable up to ``durable_end``: read on to there."""
        with self._wake:
            if durable_end > self._durable_end:
                self._durable_end = durable_end
                self._wake.notify()

    def handle(self, record: logging.LogRecord) -> bool:
        return False  # records come from the journal; see the class docstring

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() bypasses it
        pass

    # -- the backend's thread --------------------------------------------------------------

    def _next_wake(self, now: float) -> float:
        wake = max(self._next_checkpoint, self._retry_at)
        policy = None if self._resume_pending else self.policy  # a stale one's deadlines
        deadline = policy.next_deadline() if policy is not None else None
        return wake if deadline is None else min(wake, deadline)

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                readable = self.offset < self._durable_end and now >= self._retry_at
                if not readable and not self._closing:
                    self._wake.wait(max(0.0, self._next_wake(now) - now))
                end, closing = self._durable_end, self._closing
            now = time.monotonic()
            try:
                if self._resume_pending and now >= self._retry_at:
                    self._resume_policy()
                if self.policy is not None and not self._resume_pending:
                    self._deliver(self._policy_step(self.policy.due, now))
                if self.offset < end and now >= self._retry_at:
                    self._follow(end, now)
                if time.monotonic() >= self._next_checkpoint:
                    self._checkpoint_or_rewind()
            except _Rewound:
                pass
            except Exception:  # a bug must cost a record, never the backend
                self._failure("failed")
                time.sleep(0.1)
            if closing and self.offset >= end:
                break
            if closing and self._retry_at > now:
                time.sleep(min(0.05, self._retry_at - now))  # a full disk while draining
        self._finish()

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
        entries = read_entries(self._journal_path, self.offset, end)
        count = 0
        for count, (entry_start, entry_end, frame) in enumerate(entries, 1):
            record = self._record(frame, entry_start, entry_end)
            if record is not None:
                self._take(record)
            self.offset = entry_end
            if count == _CHUNK_ENTRIES:
                break
        if count == 0:
            # An entry below the durable end that does not read back (damaged on disk):
            # never spin on it; say so and look again now and then.
            self._retry_at = time.monotonic() + _RETRY_AFTER
            if self._unreadable_at != self.offset:
                self._unreadable_at = self.offset
                _log.error(
                    "backend %s: the journal does not read back at offset %d; retrying",
                    self.name,
                    self.offset,
                )

    def _record(self, frame: bytes, start: int, end: int) -> logging.LogRecord | None:
        """The LogRecord of a journaled record, if it reaches this backend."""
        try:
            envelope = decode_journaled(frame)
            if envelope["kind"] != RECORD:
                return None  # a goodbye
            record = build_record(envelope, start, end)
        except Exception:
            self._failure("could not read a journal entry")
            return None
        key = (record.name, record.levelno)
        reached = self._reach_cache.get(key)
        if reached is None:
            try:
                reached = reaches(self, record)  # runs the logger's filters, which may raise
            except Exception:
                self._failure("could not route a record (a logger filter failed)")
                return None
            if not logging.getLogger(record.name).filters:  # else it depends on the record
                self._reach_cache[key] = reached
        return record if reached else None

    def _take(self, record: logging.LogRecord) -> None:
        if self.policy is None:
            self._deliver([record])
        else:
            self._deliver(self._policy_step(self.policy.accept, record, time.monotonic()))

    def _checkpoint_or_rewind(self) -> None:
        try:
            self._write_checkpoint()
        except OSError as exc:
            if self._can_rewind():
                self._rewind(exc)
            self._failure("could not write its checkpoint")

    def _rewind(self, error: OSError) -> None:
        """A write failed (a full disk): go back to the last checkpoint and, after a pause,
        read the journal again from there. Nothing is lost and nothing is written twice."""
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
        self.offset = int(saved["offset"])
        self._resume_pending = self._new_policy is not None  # its memory is past the checkpoint
        self._retry_at = time.monotonic() + _RETRY_AFTER
        raise _Rewound from error

    def _write_checkpoint(self) -> None:
        """Flush the backend, then record how far it got (atomically).

        An OSError (a full disk) propagates to the caller, which rewinds."""
        if self._checkpoint_path is None:
            return
        self._next_checkpoint = time.monotonic() + self.checkpoint_interval
        if self._resume_pending:
            return  # back at the last checkpoint, waiting to retry: nothing new to record
        try:
            checkpoint = getattr(self.inner, "checkpoint", None)
            if checkpoint is None:
                self.inner.flush()
            last = self._last_checkpoint or {}
            policy = self.policy
            state = {
                "offset": self.offset,
                "backend": (
                    _checkpoint.merged(last.get("backend"), checkpoint())
                    if checkpoint is not None
                    else None
                ),
                "policy": None
                if policy is None
                else {
                    "state": policy.checkpoint(),
                    "held": policy.held_starts(),
                    "remember_from": policy.remember_from(),
                },
            }
            if policy is not None:
                # Earlier positions with their policy states: for a backend that turns out,
                # after a crash, to have got less far than its last checkpoint (W&B).
                history = last.get("history", [])
                if last.get("offset") != state["offset"] and "policy" in last:
                    history = [{"offset": last["offset"], "policy": last["policy"]}, *history]
                state["history"] = history[:_HISTORY]
            if state == self._last_checkpoint:
                return
            _checkpoint.save(self._checkpoint_path, state)
            self._last_checkpoint = state
        except OSError:
            raise
        except Exception:
            self._failure("could not write its checkpoint")
            return
        if self._write_error is not None and self._last_checkpoint is state:
            _log.warning("backend %s writes again", self.name)
            self._write_error = None

    def _register_new_file(self) -> None:
        """The backend opened a file (before writing to it), or a W&B run: add it to the
        last checkpoint, so that a restart cuts it back (resumes it) too.

        Position, policy state and the other files stay as they were checkpointed: this runs
        in the middle of handing on records (a policy may have emitted more than is written
        yet), so only the last checkpoint is known to be consistent."""
        assert self._checkpoint_path is not None and self._last_checkpoint is not None
        last = self._last_checkpoint
        now = self.inner.checkpoint()  # type: ignore[attr-defined]
        backend = _checkpoint.merged(last.get("backend"), now, opened=True)
        state = {**last, "backend": backend}
        _checkpoint.save(self._checkpoint_path, state)
        self._last_checkpoint = state

    def _can_rewind(self) -> bool:
        return self._last_checkpoint is not None and getattr(self.inner, "raise_os_errors", False)

    def _policy_step(self, step: Any, *args: Any) -> list[logging.LogRecord]:
        try:
            return step(*args)  # type: ignore[no-any-return]
        except Exception:
            self._failure("its rank policy failed on a record")
            return []

    def _deliver(self, records: list[logging.LogRecord]) -> None:
        for record in records:
            try:
                self.inner.handle(record)
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
            self._failure("could not write its last checkpoint")
        try:
            self.inner.flush()
            self.inner.close()
        except Exception:
            _log.exception("backend %s failed to close", self.name)
            return
        self._closed_cleanly = settled

    # -- shutdown --------------------------------------------------------------------------

    def request_close(self) -> None:
        """Ask the backend to read to the durable end, then close, without waiting."""
        with self._wake:
            self._closing = True
            self._wake.notify()

    def close_within(self, deadline: float) -> bool:
        """Drain, then close the backend; abandon it if the deadline passes first.

        Call :meth:`request_close` on every backend first so that they all drain at once.
        """
        self.request_close()
        if self._thread.ident is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self.abandoned = True
            _log.error(
                "backend %s did not drain within the drain bound; abandoning it %.1f MiB "
                "short of the journal's end",
                self.name,
                (self._durable_end - self.offset) / (1 << 20),
            )
            return False
        return self._closed_cleanly

    def close(self) -> None:
        # Closing goes through close_within(); logging.shutdown() must not block on a backend.
        super().close()

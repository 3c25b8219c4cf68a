"""One backend fed the journal's records, step by step: a journal range, a rank policy, a
:class:`~.sink.Sink` and a clock in; a result out (:class:`Outcome`). No thread of its own.

Each backend keeps a checkpoint (``checkpoints.py``): the journal offset it has written
through and, for a :class:`~.protocol.Resumable` handler, its own state (the files it owns
and their sizes then). After a crash the files are cut back to those sizes and the backend
reads on from that offset, so nothing is written twice or lost. A write error (a full disk)
comes back from the sink as a value: the feed goes back to the last checkpoint and, after a
pause, reads again from there. The thread that drives a feed in the backends' process is
``runner.py``; :func:`replay` drives one on the caller's thread, so tests call the same
logic directly.

    Runner ──> Feed ──> Sink ──> handler
                 └────> Checkpoints ──> Sink
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ranklog.backends.checkpoints import Checkpoints
from ranklog.backends.journaled import journaled_record_decoder
from ranklog.backends.policies import RankPolicy
from ranklog.backends.protocol import EnvelopeItem
from ranklog.backends.sink import Sink
from ranklog.journal import DamageReport, Entry, read_entries

_log = logging.getLogger(__name__)
_RETRY_AFTER = 1.0
_CHUNK_ENTRIES = 4096  # entries read between looks at checkpoints and policy deadlines
_BATCH = 256  # envelopes per handle_envelopes call: few enough to stay in the CPU's caches
_BEHIND_WARNING_BYTES = 8 << 20
_BEHIND_WARNING_EVERY = 30.0

Clock = Callable[[], float]


class Outcome(enum.Enum):
    """What one :meth:`Feed.read_on` came to."""

    #: Read on (a record the backend failed on is reported, and costs that record only).
    DELIVERED = "delivered"
    #: A write error: back at the last checkpoint, reading again from there after a pause.
    REWOUND = "rewound"
    #: A bug escaped (reported): pause before the next call.
    FAILED = "failed"


DELIVERED, REWOUND, FAILED = Outcome.DELIVERED, Outcome.REWOUND, Outcome.FAILED


class Feed:
    """Feeds ``sink`` (behind a rank policy, if any) the journal's records it gets, and
    checkpoints how far it got.

    ``policy`` makes a fresh policy: one is made again, from the checkpoint, whenever the
    backend goes back to it (a restart, a rewind). ``clock`` gives monotonic seconds: policy
    deadlines, checkpoints and retries follow it.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        policy: Callable[[], RankPolicy] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.clock = clock
        self._new_policy = policy
        # Made once now so that a bad policy fails the configuration, not the first record;
        # it is made again from the checkpoint before use.
        self.policy = policy() if policy is not None else None
        self.checkpoints = Checkpoints(sink, has_policy=policy is not None, clock=clock)
        self._resume_pending = False  # the policy must be rebuilt from the last checkpoint
        self.offset = 0  # journal position read through
        self._journal_path: Path | None = None
        self._retry_at = 0.0
        self._next_behind_warning = 0.0
        self._unreadable_at: int | None = None
        self._damage = DamageReport(f"backend {self.name}", _log)

    @property
    def failed(self) -> int:
        """Records (and other steps) the backend or its policy failed on."""
        return self.sink.failed

    def resume(self, journal: Path, state_dir: Path | None, *, from_start: bool = False) -> None:
        """Go back to this backend's checkpoint in ``state_dir`` (or to the journal's start):
        its offset, its handler's state, its policy. ``state_dir`` None: no checkpoints."""
        self._journal_path = journal
        if state_dir is None:
            self.offset, self._resume_pending = 0, False
            return
        self.offset = self.checkpoints.resume(journal, state_dir, from_start=from_start)
        self._resume_pending = self._new_policy is not None

    def needed_from(self) -> int:
        """The lowest journal offset this backend may read again: none before it is needed."""
        return self.checkpoints.needed_from(self.offset)

    # -- one round of work, on whichever thread runs it -----------------------------------

    def read_on(self, end: int) -> Outcome:
        """Do what is due by the clock: rebuild the policy, hand on what its deadlines
        release, read the journal on towards ``end`` (a chunk), checkpoint."""
        try:
            return self._read_on(end, self.clock())
        except Exception:  # a bug must cost a record, never the backend
            self.sink.failure("failed")
            return FAILED

    def _read_on(self, end: int, now: float) -> Outcome:
        if self._resume_pending and now >= self._retry_at and self._resume_policy() is REWOUND:
            return REWOUND
        policy = None if self._resume_pending else self.policy
        if policy is not None and self._deliver(self._policy_call(policy.due, now)) is REWOUND:
            return REWOUND
        if self.offset < end and now >= self._retry_at and self._follow(end, now) is REWOUND:
            return REWOUND
        if self.clock() < self.checkpoints.next_due:
            return DELIVERED
        if self._resume_pending:  # back at the last checkpoint: nothing new to record
            self.checkpoints.postpone()
            return DELIVERED
        error = self.checkpoints.write(self.offset, self.policy)
        if error is None:
            return DELIVERED
        return self._write_failed(error, "could not write its checkpoint")

    def next_due(self) -> float:
        """When, by the clock, :meth:`read_on` next has more to do than read new entries: a
        checkpoint, a retry, a policy deadline."""
        wake = max(self.checkpoints.next_due, self._retry_at)
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
        self.read_on(end)
        while self.offset < end and self.clock() >= self.retry_at:
            before = self.offset
            if self.read_on(end) is FAILED and self.offset == before:
                break

    def finish(self) -> bool:
        """Hand on what the policy holds, checkpoint, flush and close the handler. True if
        all of it was written and checkpointed."""
        settled = self._settle()
        return self.sink.close() and settled

    def _settle(self) -> bool:
        if self._resume_pending and self._resume_policy() is REWOUND:
            return False  # what is not written stays in the journal: the next start writes it
        if (
            self.policy is not None
            and self._deliver(self._policy_call(self.policy.drain)) is REWOUND
        ):
            return False
        error = self.checkpoints.write(self.offset, self.policy)
        if error is None:
            return True
        if self.checkpoints.can_rewind():
            self._rewind(error)
        self.sink.failure("could not write its last checkpoint", error)
        return False

    def _resume_policy(self) -> Outcome:
        """Make the policy again as it was at the last checkpoint: its own state, the records
        it held then (taken again, in order), and the records before the checkpoint it must
        remember (``first``: the steps it has seen; shown again, nothing handed on)."""
        assert self._new_policy is not None and self._journal_path is not None
        saved = (self.checkpoints.last or {}).get("policy") or {}
        policy = self.policy = self._new_policy()
        policy.restore(saved.get("state"))
        held = set(saved.get("held", ()))
        remember = saved.get("remember_from")
        begin = min([*held, *([remember] if remember is not None else [])], default=None)
        if begin is not None:
            now = self.clock()
            entries = read_entries(self._journal_path, begin, self.offset, self._damage)
            for start, end, frame in entries:
                record = self.sink.record(frame, start, end)
                if record is None:
                    continue
                if start in held:
                    if self._deliver(self._policy_call(policy.accept, record, now)) is REWOUND:
                        return REWOUND
                elif remember is not None and start >= remember:
                    self._policy_call(policy.remember, record, now)
        self._resume_pending = False
        return DELIVERED

    def _follow(self, end: int, now: float) -> Outcome:
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
        read, outcome = self._hand_on(entries, _CHUNK_ENTRIES)
        if read == 0:
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
        return outcome

    def _hand_on(self, entries: Iterable[Entry], limit: int) -> tuple[int, Outcome]:
        """Hand on up to ``limit`` of ``entries``: how many were read, and the outcome.

        Records go as decoded envelopes, in batches, to a sink that takes them when no rank
        policy needs a LogRecord and the route does not depend on the record; else (and for
        an entry that does not decode to the typed struct) as LogRecords, in journal order.
        ``offset`` is past an entry only once what it brought was handed on."""
        sink = self.sink
        batch: list[EnvelopeItem] | None = (
            [] if self.policy is None and sink.takes_envelopes else None
        )
        reaches, decode, count = sink.route.reaches_logger, journaled_record_decoder(), 0
        for count, (start, end, frame) in enumerate(entries, 1):
            typed = None if batch is None else decode(frame)
            reached = None if typed is None else reaches(typed.logger, typed.level)
            if reached is None:  # the LogRecord way, after what is batched before it
                if batch and self._deliver_batch(batch, start) is REWOUND:
                    return count, REWOUND
                record = sink.record(frame, start, end, typed)
                if record is not None and self._take(record) is REWOUND:
                    return count, REWOUND
            elif reached:
                assert batch is not None and typed is not None
                batch.append((typed, start, end))
                if len(batch) == _BATCH and self._deliver_batch(batch, end) is REWOUND:
                    return count, REWOUND
            if not batch:
                self.offset = end
            if count == limit:
                break
        if batch and self._deliver_batch(batch, end) is REWOUND:
            return count, REWOUND
        return count, DELIVERED

    def _deliver_batch(self, batch: list[EnvelopeItem], read_to: int) -> Outcome:
        """Hand on ``batch``; then the journal is read to ``read_to``."""
        error = self.sink.deliver_envelopes(batch)
        if error is not None and self._write_failed(error, "failed on a record") is REWOUND:
            return REWOUND
        batch.clear()
        self.offset = read_to
        return DELIVERED

    def _take(self, record: logging.LogRecord) -> Outcome:
        if self.policy is None:
            return self._deliver((record,))
        return self._deliver(self._policy_call(self.policy.accept, record, self.clock()))

    def _policy_call(self, method: Any, *args: Any) -> list[logging.LogRecord]:
        try:
            return method(*args)  # type: ignore[no-any-return]
        except Exception:
            self.sink.failure("its rank policy failed on a record")
            return []

    def _deliver(self, records: Iterable[logging.LogRecord]) -> Outcome:
        deliver = self.sink.deliver
        for record in records:
            error = deliver(record)
            if error is not None and self._write_failed(error, "failed on a record") is REWOUND:
                return REWOUND
        return DELIVERED

    def _write_failed(self, error: OSError, what: str) -> Outcome:
        """A write error (``what`` the backend did): rewind to the last checkpoint if the
        backend can, else report it (once) and go on."""
        if self.checkpoints.can_rewind():
            return self._rewind(error)
        self.sink.failure(what, error)
        return DELIVERED

    def _rewind(self, error: OSError) -> Outcome:
        """Go back to the last checkpoint and, after a pause, read the journal again from
        there. Nothing is lost and nothing is written twice."""
        self.offset = self.checkpoints.rewind(error, _RETRY_AFTER)
        self._resume_pending = self._new_policy is not None  # its memory is past the checkpoint
        self._retry_at = self.clock() + _RETRY_AFTER
        return REWOUND


def replay(journal: Path, feed: Feed, start: int, stop: int) -> Feed:
    """Run ``feed`` over the journal's entries in ``[start, stop)`` on this thread, as the
    backends' process would (route, rank policy, handler, failure reports) but with no
    checkpoint read or written, and time from the feed's clock only: nothing waits.

    To go on (say after moving a fake clock past a policy's deadline), call
    :meth:`Feed.run_until`; :meth:`Feed.finish` drains and closes."""
    feed.resume(journal, None)
    feed.offset = start
    feed.run_until(stop)
    return feed

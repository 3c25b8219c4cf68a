"""How a feed hands the journal's entries on to its backend (``feed.py`` has the rest).

Two ways, one result:

* as LogRecords: decode, build the record, route it through the logger tree, the rank
  policy, then ``handler.handle()``: what any ``logging.Handler`` gets;
* in batches of decoded envelopes, no LogRecord at all, for a backend that implements
  :class:`~.protocol.TakesEnvelopes` when nothing else needs a record: no rank policy, a
  route that does not depend on the record (no logger filters), filters the handler applies
  itself. An entry that does not decode to the typed struct goes the first way, in its place.

Either way each entry is handed on once, in journal order, and ``offset`` is past an entry
only once what it brought was handed on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ranklog.backends.policies import RankPolicy
from ranklog.backends.protocol import TakesEnvelopes
from ranklog.backends.records import build_record
from ranklog.backends.route import Route
from ranklog.journal import Entry
from ranklog.wire import (
    RECORD,
    decode_journaled,
    decode_journaled_record,
    journaled_record_decoder,
)

_BATCH = 256  # envelopes per handle_envelopes call: few enough to stay in the CPU's caches


class Handing:
    """The part of :class:`~.feed.BackendFeed` that hands entries on."""

    handler: logging.Handler
    route: Route
    policy: RankPolicy | None
    offset: int
    clock: Callable[[], float]

    def _hand_on(self, entries: Iterable[Entry], limit: int) -> int:
        """Hand on up to ``limit`` of ``entries``; how many were read."""
        batch: list[tuple[Any, int, int]] | None = [] if self._takes_envelopes() else None
        reaches, decode, count = self.route.reaches_logger, journaled_record_decoder(), 0
        for count, (start, end, frame) in enumerate(entries, 1):
            typed = None if batch is None else decode(frame)
            reached = None if typed is None else reaches(typed.logger, typed.level)
            if reached is None:  # the LogRecord way, after what is batched before it
                if batch:
                    self._deliver_envelopes(batch, start)
                record = self._record(frame, start, end, typed)
                if record is not None:
                    self._take(record)
            elif reached:
                assert batch is not None
                batch.append((typed, start, end))
                if len(batch) == _BATCH:
                    self._deliver_envelopes(batch, end)
            if not batch:
                self.offset = end
            if count == limit:
                break
        if batch:
            self._deliver_envelopes(batch, end)
        return count

    def _takes_envelopes(self) -> bool:
        handler = self.handler
        return (
            self.policy is None
            and isinstance(handler, TakesEnvelopes)
            and handler.takes_envelopes()
        )

    def _deliver_envelopes(self, batch: list[tuple[Any, int, int]], read_to: int) -> None:
        """Hand on ``batch``; then the journal is read to ``read_to``."""
        assert isinstance(self.handler, TakesEnvelopes)
        # The handler reports each record's own errors; what escapes is a write error (it
        # rewinds) or a bug.
        self._handle(self.handler.handle_envelopes, batch)
        batch.clear()
        self.offset = read_to

    def _record(
        self, frame: bytes, start: int, end: int, typed: Any = None
    ) -> logging.LogRecord | None:
        """The LogRecord of a journaled record, if it reaches this backend."""
        try:
            envelope = typed if typed is not None else decode_journaled_record(frame)
            if envelope is None:
                envelope = decode_journaled(frame)
                if envelope["kind"] != RECORD:
                    return None  # a goodbye
            record = build_record(envelope, start, end)
        except Exception:
            self._failure("could not read a journal entry")
            return None
        try:
            reached = self.route.reaches(record)  # runs the logger's filters, which may raise
        except Exception:
            self._failure("could not route a record (a logger filter failed)")
            return None
        return record if reached else None

    def _take(self, record: logging.LogRecord) -> None:
        if self.policy is None:
            self._deliver([record])
        else:
            self._deliver(self._policy_step(self.policy.accept, record, self.clock()))

    def _policy_step(self, step: Any, *args: Any) -> list[logging.LogRecord]:
        try:
            return step(*args)  # type: ignore[no-any-return]
        except Exception:
            self._failure("its rank policy failed on a record")
            return []

    def _deliver(self, records: list[logging.LogRecord]) -> None:
        handle = self.handler.handle
        for record in records:
            self._handle(handle, record)

    def _handle(self, handle: Callable[[Any], Any], what: Any) -> None:
        """``handle(what)``; a write error rewinds to the last checkpoint (if it can)."""
        try:
            handle(what)
        except OSError as exc:
            if self._can_rewind():
                self._rewind(exc)
            self._failure("failed on a record", exc)
        except Exception:
            self._failure("failed on a record")

    # What the feed provides.

    def _can_rewind(self) -> bool:
        raise NotImplementedError

    def _rewind(self, error: OSError) -> None:
        raise NotImplementedError

    def _failure(self, what: str, error: OSError | None = None) -> None:
        raise NotImplementedError

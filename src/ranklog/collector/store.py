"""The journal, what was accepted into it, and the backends' process that follows it: what
``serve`` and ``replay`` share."""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack

from ranklog.collector.backend_process import BackendProcess
from ranklog.collector.events import EventLog, event
from ranklog.collector.peers import RankTable
from ranklog.collector.receive import Received, recover
from ranklog.collector.settings import BackendSettings
from ranklog.collector.stats import CollectorStats, log_status
from ranklog.journal import (
    SEGMENT_BYTES,
    Journal,
    first_offset,
    journal_path,
)
from ranklog.snapshots import latest_snapshot, snapshot_path, write_snapshot

_log = logging.getLogger(__name__)
_JOURNAL_RETRY = 0.5  # seconds between tries of a journal that could not be written
_SNAPSHOT_VERSION = 1
_MIN_SEGMENT_BYTES = 1 << 20


def segment_bytes(retention: int) -> int:
    """A segment's size: :data:`SEGMENT_BYTES`, or a quarter of a smaller retention (so
    that retention deletes in steps small beside it), at least 1 MiB."""
    return max(_MIN_SEGMENT_BYTES, min(SEGMENT_BYTES, retention // 4))


class Store:
    """Opens the journal, reads it back (every seq accepted before), then starts the
    backends' process: each backend resumes from its checkpoint and reads the journal on to
    its durable end. A bad config file or policy fails here, before anything listens."""

    def __init__(self, settings: BackendSettings, *, from_start: bool = False) -> None:
        self.settings = settings
        settings.output_path.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(settings.output_path)
        self.ranks = RankTable()
        self.stats = CollectorStats()
        self.journal = Journal(
            journal_path(settings.output_path),
            segment_bytes=segment_bytes(settings.retention_bytes),
        )
        self._snapshot_error: str | None = None
        self._blocked: str | None = None  # why the journal cannot be written, while it cannot
        self._retry_at = 0.0
        try:
            self._recover()
            self.stats.before = self.stats.accepted
            self.backends = BackendProcess(
                settings.spec(from_start=from_start, log_level=_log.getEffectiveLevel())
            )
        except BaseException:
            self.journal.close()
            raise

    def _recover(self) -> None:
        """The de-duplication state: the latest snapshot, then the journal after it."""
        now = time.monotonic()
        start = self._read_snapshot(now)
        entries = (frame for _, _, frame in self.journal.read(start, self.journal.durable_end))
        total = recover(entries, self.ranks, self.stats, now)
        if total or start:
            _log.info(
                "journal %s: snapshot to offset %d, then %d entries; %d rank incarnations "
                "already accepted",
                self.journal.path,
                start,
                total,
                len(self.ranks),
            )
        gone = first_offset(self.journal.path)
        if gone and start < gone:
            _log.warning(
                "journal %s: no snapshot covers the %.1f MiB deleted before offset %d; ranks "
                "resending records from there would be accepted again",
                self.journal.path,
                gone / (1 << 20),
                gone,
            )

    def _read_snapshot(self, now: float) -> int:
        """Load the latest snapshot; the offset it is valid to (0 if none is usable)."""
        offset = latest_snapshot(self.journal.path)
        if offset is None:
            return 0
        path = snapshot_path(self.journal.path, offset)
        try:
            state: dict[str, Any] = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
            if state["version"] != _SNAPSHOT_VERSION or state["offset"] != offset:
                raise ValueError(f"version {state['version']}, offset {state['offset']}")
            if offset > self.journal.durable_end:
                raise ValueError(f"past the journal's end, {self.journal.durable_end}")
            self.ranks = RankTable.from_state(state["ranks"], now)
        except Exception as exc:  # unreadable: the journal itself still says it all
            _log.warning("snapshot %s unusable (%s); reading the whole journal", path, exc)
            self.ranks = RankTable()
            return 0
        self.stats.accepted = int(state["accepted"])
        return offset

    def _snapshot(self) -> None:
        """Save the de-duplication state, valid to the durable end: restarts read the
        journal after it only. A failure (a full disk) keeps the older one."""
        offset = self.journal.durable_end
        state = {
            "version": _SNAPSHOT_VERSION,
            "offset": offset,
            "accepted": self.stats.accepted,
            "ranks": self.ranks.to_state(),
        }
        try:
            write_snapshot(self.journal.path, offset, msgpack.packb(state))
        except OSError as exc:
            if self._snapshot_error is None:
                _log.warning("cannot write the journal's snapshot (%s); retrying later", exc)
            self._snapshot_error = str(exc)
        else:
            self._snapshot_error = None

    def _rotate(self) -> None:
        """A new journal segment (and a snapshot where it starts)."""
        try:
            self.journal.rotate()
        except OSError as exc:
            if self._snapshot_error is None:
                _log.warning("cannot start a new journal segment (%s); retrying later", exc)
            self._snapshot_error = str(exc)
            return
        self._snapshot()

    def commit(self, received: Received, now: float) -> bool:
        """Journal and fsync what was received, then account for it: nothing is acked
        before it is durable, and nothing reaches a backend before it is acked. If the
        journal cannot take it, nothing is accepted (False): the ranks keep their records
        and resend them."""
        kept = True
        if received.accepted and now < self._retry_at:
            received.refuse()  # the disk was just full: let the ranks resend soon
            kept = False
        if received.accepted:
            try:
                for frame in received.frames:
                    self.journal.append(frame)
                self.journal.sync()
            except OSError as exc:
                self._journal_failed(exc, now)
                received.refuse()
                kept = False
            else:
                self._journal_ok()
                received.apply(self.stats)
                if self.journal.full:
                    self._rotate()
        self.events.write(received.events)
        return kept

    def _journal_failed(self, exc: OSError, now: float) -> None:
        reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        self._retry_at = now + _JOURNAL_RETRY
        if self._blocked is None:
            _log.error(
                "cannot write the journal %s (%s); not acknowledging anything until it can: "
                "the ranks hold their records and resend them. Free some space.",
                self.journal.path,
                reason,
            )
            self.events.write([event("journal_blocked", error=reason)])
        self._blocked = reason

    def _journal_ok(self) -> None:
        if self._blocked is not None:
            _log.warning("journal writable again; acknowledging and delivering resumes")
            self.events.write([event("journal_resumed", after=self._blocked)])
            self._blocked = None

    def advance(self) -> None:
        """Let the backends read on to what is durable."""
        self.backends.advance(self.journal.durable_end)

    def close(self, what: str = "collector stopped", *, quiet: bool = False) -> bool:
        """Drain the backends (within the drain timeout), report (``what`` ended; not with
        ``quiet``), close the journal; True if every backend drained and closed."""
        try:
            clean = self.backends.drain(self.journal.durable_end, self.settings.drain_timeout)
            if quiet:
                return clean
            log_status(self.stats, self.ranks, 0.0)
            _log.info(
                "%s: %d records accepted in this run (%d in this directory in all)",
                what,
                self.stats.accepted - self.stats.before,
                self.stats.accepted,
            )
        finally:
            try:
                self.journal.close()
            finally:
                if self.journal.durable_end != latest_snapshot(self.journal.path):
                    self._snapshot()  # so the next start reads nothing of the journal
        return clean

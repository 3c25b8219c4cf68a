"""The journal, what was accepted into it, and the backends' process that follows it: what
``serve`` and ``replay`` share."""

from __future__ import annotations

import logging
import time

from ranklog.collector.backend_process import BackendProcess
from ranklog.collector.events import EventLog, event, log_status
from ranklog.collector.peers import RankTable
from ranklog.collector.receive import CollectorStats, Received, recover
from ranklog.collector.settings import BackendSettings
from ranklog.journal import Journal, journal_path

_log = logging.getLogger(__name__)
_JOURNAL_RETRY = 0.5  # seconds between tries of a journal that could not be written


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
        self.journal = Journal(journal_path(settings.output_path))
        self._blocked: str | None = None  # why the journal cannot be written, while it cannot
        self._retry_at = 0.0
        try:
            self._recover()
            self.backends = BackendProcess(
                settings.spec(from_start=from_start, log_level=_log.getEffectiveLevel())
            )
        except BaseException:
            self.journal.close()
            raise

    def _recover(self) -> None:
        entries = (frame for _, _, frame in self.journal.read(0, self.journal.durable_end))
        total = recover(entries, self.ranks, self.stats, time.monotonic())
        if total:
            _log.info(
                "journal %s: %d entries from %d rank incarnations already accepted",
                self.journal.path,
                total,
                len(self.ranks),
            )

    def commit(self, received: Received, now: float) -> None:
        """Journal and fsync what was received, then account for it: nothing is acked
        before it is durable, and nothing reaches a backend before it is acked. If the
        journal cannot take it, nothing is accepted: the ranks keep their records and
        resend them."""
        if received.accepted and now < self._retry_at:
            received.accepted.clear()  # the disk was just full: let the ranks resend soon
        if received.accepted:
            try:
                for frame in received.frames:
                    self.journal.append(frame)
                self.journal.sync()
            except OSError as exc:
                self._journal_failed(exc, now)
                received.accepted.clear()
            else:
                self._journal_ok()
                received.apply(self.stats)
        self.events.write(received.events)

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

    def close(self) -> bool:
        """Drain the backends (within the drain timeout), report, close the journal; True
        if every backend drained and closed."""
        try:
            clean = self.backends.drain(self.journal.durable_end, self.settings.drain_timeout)
            log_status(self.stats, self.ranks, 0.0)
            _log.info("collector stopped: %d records accepted", self.stats.accepted)
        finally:
            self.journal.close()
        return clean

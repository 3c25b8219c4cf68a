"""The collector's counters and the status line that reports them (apart from the events,
so that the receive step, the events and the counters do not import each other)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ranklog.collector.joins import Joins
from ranklog.collector.peers import RankTable
from ranklog.reporting import ReportOnce

# Rejections are the receive step's lines: they keep its logger's name.
_log = logging.getLogger("ranklog.collector.receive")
# The status line keeps the logger it always had.
_status_log = logging.getLogger("ranklog.collector.events")


@dataclass
class CollectorStats:
    """Counters the collector reports in its status line and on exit. ``rejected`` counts
    rejected frames by reason, and logs the first of each reason."""

    accepted: int = 0  # in this output dir, over its history
    before: int = 0  # ... of which before this run (read back from the journal)
    duplicates: int = 0
    rejected: ReportOnce = field(default_factory=lambda: ReportOnce(_log))
    joins: Joins = field(default_factory=Joins)


class StatusLine:
    """Logs throughput, counters and the ranks' progress every ``interval`` seconds."""

    def __init__(self, stats: CollectorStats, ranks: RankTable, interval: float, now: float):
        self.stats = stats
        self.ranks = ranks
        self.interval = interval
        self.waiting_for: Callable[[], str] = str  # what the exit rule waits for, if anything
        self.stragglers: Callable[[], str] = str  # ranks well behind the best, if any
        self._next = now + interval
        self._last_accepted = stats.accepted

    def tick(self, now: float) -> None:
        if now >= self._next:
            rate = (self.stats.accepted - self._last_accepted) / self.interval
            self._last_accepted = self.stats.accepted
            self._next = now + self.interval
            notes = "; ".join(filter(None, (self.waiting_for(), self.stragglers())))
            log_status(self.stats, self.ranks, rate, notes)


def log_status(stats: CollectorStats, ranks: RankTable, rate: float, notes: str = "") -> None:
    # The rejection counts stay last on the line: scripts (and tests) read them from there.
    _status_log.info(
        "%.0f records/s; %d accepted in this run (%d in this directory), %d duplicates "
        "dropped; %s; %srejected %s",
        rate,
        stats.accepted - stats.before,
        stats.accepted,
        stats.duplicates,
        ranks.status(),
        f"{notes}; " if notes else "",
        dict(stats.rejected.counts) or 0,
    )

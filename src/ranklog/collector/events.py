"""What the collector tells its user: the events file (``.ranklog/events.jsonl``) and the
status line."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ranklog.collector.peers import RankTable
from ranklog.journal import STATE_DIR

if TYPE_CHECKING:
    from ranklog.collector.receive import CollectorStats

_log = logging.getLogger(__name__)
# In the state folder: a *.jsonl glob next to the metric files must not pick it up.
EVENTS_FILE = Path(STATE_DIR, "events.jsonl")

Event = tuple[str, dict[str, Any]]  # (name, fields): rank_joined, rank_finished, ...


def event(name: str, **fields: Any) -> Event:
    return name, fields


class EventLog:
    """Appends one JSON line per event: joins, goodbyes, silences, a blocked journal."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / EVENTS_FILE

    def write(self, events: Iterable[Event]) -> None:
        lines = [
            json.dumps({"time": time.time(), "event": name, **fields}) + "\n"
            for name, fields in events
        ]
        if not lines:
            return
        try:
            with open(self.path, "a") as f:
                f.writelines(lines)
        except OSError:
            pass  # each event is in the collector's log too; a full disk must not stop us


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
    _log.info(
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

"""Joins, summarised: a job of a thousand ranks (or a flood of made-up incarnations) gets
one log line a second, not one per incarnation.

The joins of a second go out as one line that names the first few (after a quiet second,
at once: a small job's joins read as before). Each named one
is a ``rank_joined`` event; the rest are counted in one ``ranks_joined`` event, beside an
``incarnations_evicted`` one when the rank table made room.
"""

from __future__ import annotations

import logging

from ranklog.collector.events import Event, event
from ranklog.collector.peers import Peer, RankTable

_log = logging.getLogger(__name__)
SUMMARY_EVERY = 1.0  # seconds between join lines
NAMED = 8  # joins named in one line (and given their own event)


class Joins:
    """Notes each join (:meth:`joined`); one line and a few events per second (:meth:`tick`)."""

    def __init__(self) -> None:
        self._named: list[Peer] = []
        self._more = 0
        self._evicted_before = 0
        self._quiet_until = 0.0

    def joined(self, peer: Peer) -> None:
        if len(self._named) < NAMED:
            self._named.append(peer)
        else:
            self._more += 1

    def tick(self, ranks: RankTable, now: float) -> list[Event]:
        """The line and events for the joins (and evictions) since the last one, at most
        once per :data:`SUMMARY_EVERY` seconds."""
        evicted = ranks.evicted - self._evicted_before
        if now < self._quiet_until or not (self._named or evicted):
            return []
        self._quiet_until = now + SUMMARY_EVERY
        self._evicted_before = ranks.evicted
        named, more = self._named, self._more
        self._named, self._more = [], 0
        parts = [
            f"rank {p.rank} joined (host {p.host}, pid {p.pid}, world size {p.world_size})"
            for p in named
        ]
        events = [event("rank_joined", rank=p.rank, host=p.host, pid=p.pid) for p in named]
        if more:
            parts.append(f"and {more} more rank incarnations joined")
            events.append(event("ranks_joined", count=len(named) + more, not_named=more))
        if evicted:
            parts.append(
                f"the rank table is full ({ranks.capacity} incarnations): {evicted} evicted "
                "(from earlier runs, silent or never sent a record first)"
            )
            events.append(event("incarnations_evicted", count=evicted, capacity=ranks.capacity))
        level = logging.WARNING if more or evicted else logging.INFO
        _log.log(level, "%s", "; ".join(parts))
        return events

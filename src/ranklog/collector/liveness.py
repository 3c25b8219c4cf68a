"""Which ranks went silent, and when a collector run with ``--exit-when-done`` may exit."""

from __future__ import annotations

import logging

from ranklog.collector.events import Event, event
from ranklog.collector.launch import disagreement, world_sizes
from ranklog.collector.peers import RankTable
from ranklog.reporting import ReportOnce

_log = logging.getLogger(__name__)
_NAMED_SILENT = 8  # ranks named one line each when they go silent together; the rest counted
_QUIET_BEFORE_EXIT = 0.3
_LONGEST_WAIT_FOR_QUIET = 3.0
SILENCE_AFTER_PARENT = 10.0  # a rank sends a heartbeat every second while it lives


class Liveness:
    """Watches ``ranks``: one unheard for ``silence_timeout`` seconds counts as gone.

    Done means each of the ``world_size`` ranks (without one, the largest any rank
    reported) finished or went silent in this run, or never connected within
    ``connect_timeout`` of ``started_at`` (with None, a rank that never connected is waited
    for: a job may take long to load its model).
    """

    def __init__(
        self,
        ranks: RankTable,
        world_size: int | None,
        silence_timeout: float,
        started_at: float,
        connect_timeout: float | None = None,
    ) -> None:
        self.ranks = ranks
        self.world_size = world_size
        self.silence_timeout = silence_timeout
        self.started_at = started_at
        self.connect_timeout = connect_timeout
        self._done_at: float | None = None
        self._report = ReportOnce(_log)
        self._silence_check_at = 0.0

    def newly_silent(self, now: float, *, at_once: bool = False) -> list[Event]:
        """Report the ranks that just went silent (checked once a second, or ``at_once``;
        more than a few at once, as after a flood of made-up incarnations, in one line)."""
        if now < self._silence_check_at and not at_once:
            return []
        self._silence_check_at = now + 1.0
        silent = self.ranks.newly_silent(now, self.silence_timeout)
        if len(silent) > _NAMED_SILENT:
            named = ", ".join(f"rank {p.rank} (host {p.host}, pid {p.pid})" for p in silent[:4])
            _log.warning(
                "%d rank incarnations have been silent for %.0fs (%d never sent a record; "
                "%s, ...); counting them as gone",
                len(silent),
                self.silence_timeout,
                sum(not peer.recorded for peer in silent),
                named,
            )
            return [event("ranks_silent", count=len(silent))]
        events = []
        for peer in silent:
            _log.warning(
                "rank %d (host %s, pid %d) has been silent for %.0fs; counting it as gone",
                peer.rank,
                peer.host,
                peer.pid,
                now - peer.last_seen,
            )
            events.append(
                event("rank_silent", rank=peer.rank, pid=peer.pid, last_step=peer.last_step)
            )
        return events

    def parent_exited(self, pid: int) -> None:
        """The process that started this collector for its job has exited (rank 0, or
        whatever started it): ranks not heard yet never will be, and a rank silent for a
        few seconds is gone, not only after ``silence_timeout``."""
        self.connect_timeout = 0.0
        self.silence_timeout = min(self.silence_timeout, SILENCE_AFTER_PARENT)
        _log.info(
            "the process that started this collector (pid %d) has exited; ranks not heard "
            "from within %gs count as gone",
            pid,
            self.silence_timeout,
        )

    def may_exit(self, now: float, last_message_at: float) -> bool:
        """Every rank is done, and the ranks are quiet: a rank whose last ack went missing
        can resend once and hear back, rather than wait out its close timeout."""
        if not self._all_done(now):
            return False
        done_at = self._done_at = self._done_at or now
        quiet_since = max(last_message_at, done_at)
        return now - quiet_since >= _QUIET_BEFORE_EXIT or now - done_at >= _LONGEST_WAIT_FOR_QUIET

    def waiting_for(self) -> str:
        """What the exit rule waits for, for the status line ('' when nothing)."""
        world_size = self._world_size()
        absent = self.ranks.never_seen(world_size)
        if not absent:
            return ""
        bound = "" if self.connect_timeout is None else f" (up to {self.connect_timeout:g}s)"
        differ = disagreement(self.ranks)
        why = f" (the ranks disagree on the world size: {differ})" if differ else ""
        return f"waiting for rank(s) {_ranks(absent)} to connect{bound}{why}"

    def _world_size(self) -> int:
        """The world size the ranks agree on (a launch that differs from --world-size is
        reported by ranklog.collector.launch); while they disagree, the largest of theirs
        and --world-size; with no rank heard, --world-size."""
        sizes = world_sizes(self.ranks)
        if not sizes:
            return self.world_size or self.ranks.largest_world_size()
        if len(sizes) == 1:
            return next(iter(sizes))
        return max(*sizes, self.world_size or 0)

    def _all_done(self, now: float) -> bool:
        world_size = self._world_size()
        done = self.ranks.all_done(
            world_size, now, self.started_at, self.silence_timeout, self.connect_timeout
        )
        absent = self.ranks.never_seen(world_size)
        if done and absent:
            self._report(
                "never-connected",
                "rank(s) %s never connected within %.0fs; counting them as gone",
                _ranks(absent),
                self.connect_timeout,
            )
        return done


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:16]))
    return shown if len(ranks) <= 16 else f"{shown} and {len(ranks) - 16} more"

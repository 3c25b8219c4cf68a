"""Each rank's progress: step cadence, stalls and straggler scores.

Per record the collector does O(1) work (:meth:`Cadence.record`); once a second
:meth:`Progress.check` turns that into step rates, scores and ``rank_stalled`` /
``rank_resumed`` events. Time comes in as arguments, so tests drive it with a fake clock.

Step rates: :class:`~ranklog.collector.cadence.Cadence`.

- relative score: the rank's rate / the best rate among the job's running ranks (a rank
  twice as slow as the fastest scores 0.5);
- individual score: the rank's rate / its own best rate over the run.

Both lie in [0, 1]; None until a rank has stepped for a few seconds. A stalled rank scores
0 on both: it is not stepping (its rate over the window would still show its past).
A rank whose relative score stays under :data:`STRAGGLER` for :data:`STRAGGLER_CHECKS`
checks is warned about once (``rank_straggling``), again only after it caught up.

A hung job (no rank stepping): :mod:`ranklog.collector.hung`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ranklog.collector.events import Event, event
from ranklog.collector.hung import JobStall

if TYPE_CHECKING:
    from ranklog.collector.peers import Peer, RankTable

_log = logging.getLogger(__name__)
MAX_WATCHED = 32  # metric names whose latest value is kept per rank
STRAGGLER = 0.8  # relative score under which a rank is a straggler
STRAGGLER_CHECKS = 5  # consecutive checks (seconds) under it before it is said
_CAUGHT_UP = 0.9  # relative score at which a straggler counts as caught up


def current_job(ranks: Iterable[Peer]) -> tuple[str | None, dict[int, Peer]]:
    """The job heard from last, and its latest incarnation of each rank."""
    live = [peer for peer in ranks if peer.live]
    if not live:
        return None, {}
    job = max(live, key=lambda peer: peer.last_seen).job
    latest: dict[int, Peer] = {}
    for peer in live:
        if peer.job == job and (
            peer.rank not in latest or peer.last_seen > latest[peer.rank].last_seen
        ):
            latest[peer.rank] = peer
    return job, dict(sorted(latest.items()))


def state(peer: Peer) -> str:
    """running, stalled, silent or finished."""
    if peer.finished:
        return "finished"
    if peer.silent:
        return "silent"
    return "stalled" if peer.progress.stalled_at is not None else "running"


class Progress:
    """Rates, scores and stalls of the current job's ranks, once a second.

    A rank that is heard (not silent) but has not stepped for ``stall_timeout`` seconds
    while another rank of the job stepped is stalled (``rank_stalled``); when it steps again,
    ``rank_resumed``. ``stall_timeout`` 0 turns this off.
    """

    def __init__(
        self, ranks: RankTable, stall_timeout: float, job_stall_timeout: float = 0.0
    ) -> None:
        self.ranks = ranks
        self.stall_timeout = stall_timeout
        self.hung = JobStall(job_stall_timeout)
        self.job: str | None = None
        self.job_ranks: dict[int, Peer] = {}  # the job's latest incarnation of each rank

    def check(self, now: float) -> list[Event]:
        """Update rates and scores (call it about once a second); the stall events."""
        self.job, self.job_ranks = current_job(self.ranks)
        running = [peer for peer in self.job_ranks.values() if not peer.finished]
        for peer in running:
            if peer.progress.advanced_at is None:
                peer.progress.advanced_at = now  # stepping is measured from when it joined
            peer.progress.update_rate(now)
        best = max((p.progress.rate or 0.0 for p in running if not p.silent), default=0.0)
        for peer in self.job_ranks.values():
            rate = peer.progress.rate
            peer.progress.relative = None if rate is None or best <= 0 else min(1.0, rate / best)
        events = []
        if self.stall_timeout > 0:  # 0 turns off the per-rank warnings: stalls, stragglers
            events = self._stalls(running, now)
            for peer in running:
                if peer.progress.stalled_at is not None:
                    peer.progress.relative = peer.progress.individual = 0.0
            events += self._stragglers(running)
        return events + self.hung.check(self.job, self.job_ranks, now)

    def _stragglers(self, running: list[Peer]) -> list[Event]:
        """A warning for each rank that has just fallen behind for good."""
        events = []
        for peer in running:
            cadence, score = peer.progress, peer.progress.relative
            if score is None or peer.silent or cadence.stalled_at is not None:
                continue
            if score >= _CAUGHT_UP:
                cadence.slow_checks = 0
            elif score < STRAGGLER and cadence.slow_checks >= 0:
                cadence.slow_checks += 1
                if cadence.slow_checks >= STRAGGLER_CHECKS:
                    cadence.slow_checks = -1  # said; again once it caught up
                    _log.warning(
                        "rank %d (host %s, pid %d) is a straggler: it steps at %.2f of the "
                        "best rank's rate (%.3g steps/s)",
                        peer.rank, peer.host, peer.pid, score, cadence.rate or 0.0,
                    )  # fmt: skip
                    events.append(event("rank_straggling", rank=peer.rank, pid=peer.pid,
                                        relative=round(score, 3), step=cadence.step))  # fmt: skip
        return events

    def _stalls(self, running: list[Peer], now: float) -> list[Event]:
        # A stalled rank that stepped again, up to its goodbye, resumed.
        events = [
            self._resumed(peer, now)
            for peer in self.job_ranks.values()
            if peer.progress.stalled_at is not None
            and (peer.progress.advanced_at or 0.0) > peer.progress.stalled_at
        ]
        timeout = self.stall_timeout
        recent = [p.progress.advanced_at or 0.0 for p in running if not p.silent]
        for peer in running:
            cadence = peer.progress
            advanced_at = cadence.advanced_at or 0.0
            if cadence.stalled_at is not None:
                continue
            others_moved = sum(now - moved < timeout and moved > advanced_at for moved in recent)
            if not peer.silent and now - advanced_at >= timeout and others_moved:
                cadence.stalled_at = now
                _log.warning(
                    "rank %d (host %s, pid %d) is alive but has not stepped for %.0fs "
                    "(still at step %s) while other ranks did: stalled",
                    peer.rank, peer.host, peer.pid, now - advanced_at, cadence.step,
                )  # fmt: skip
                seconds = round(now - advanced_at, 1)
                events.append(event("rank_stalled", rank=peer.rank, pid=peer.pid,
                                    step=cadence.step, seconds=seconds))  # fmt: skip
        return events

    def _resumed(self, peer: Peer, now: float) -> Event:
        cadence = peer.progress
        stalled_for = now - (cadence.stalled_at or now)
        cadence.stalled_at = None
        # Its window rate still holds the stall: no straggler warning until it caught up.
        cadence.slow_checks = -1
        _log.warning("rank %d is stepping again (step %s)", peer.rank, cadence.step)
        return event("rank_resumed", rank=peer.rank, pid=peer.pid, step=cadence.step,
                     after_stall=round(stalled_for, 1))  # fmt: skip

    def stragglers(self) -> str:
        """For the status line: the ranks well behind the best one, with their scores."""
        slow = {
            rank: round(peer.progress.relative, 2)
            for rank, peer in self.job_ranks.items()
            if peer.progress.relative is not None and peer.progress.relative < 0.8
        }
        if not slow:
            return ""
        shown = ", ".join(f"{rank}: {score}" for rank, score in list(slow.items())[:8])
        return f"stragglers (step rate vs the best rank) {shown}"

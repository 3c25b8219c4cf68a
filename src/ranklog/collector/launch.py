"""Launch mistakes the collector can see, named once each in its log, in ``events.jsonl``
and in ``ranklog top``'s state column:

- two live processes that claim the same (job, rank): a rank or a node started twice, or
  ranks given the wrong ``RANK``; their records would land in one file, interleaved;
- ranks whose world size differs from ``--world-size`` or from each other's.

The exit rule (:mod:`ranklog.collector.liveness`) follows the world size the ranks agree
on (:func:`world_sizes`); while they disagree, it waits for the largest and says why.
"""

from __future__ import annotations

import logging

from ranklog.collector.events import Event, event
from ranklog.collector.peers import Peer, RankTable
from ranklog.collector.progress import current_job

_log = logging.getLogger(__name__)
_CHECK_EVERY = 1.0
# An older incarnation heard this long after a newer one of its rank joined is alive too (a
# restarted rank's predecessor, killed, is heard no more; a rank heartbeats every second).
BOTH_HEARD = 1.0
_REPORTED_KEPT = 4096  # mistakes remembered as said (more, as from a flood: forgotten)


def world_sizes(ranks: RankTable) -> dict[int, list[int]]:
    """The current job's world sizes, each with the ranks that report it."""
    _, job = current_job(ranks)
    sizes: dict[int, list[int]] = {}
    for rank, peer in job.items():
        sizes.setdefault(peer.world_size, []).append(rank)
    return sizes


def disagreement(ranks: RankTable) -> str:
    """``'2 (ranks 0, 1), 4 (rank 2)'`` when the current job's ranks disagree, else ''."""
    sizes = world_sizes(ranks)
    if len(sizes) < 2:
        return ""
    return ", ".join(f"{size} ({_ranks(members)})" for size, members in sorted(sizes.items()))


class LaunchCheck:
    """Once a second (:meth:`check`): marks each peer's ``mistake`` and reports new ones."""

    def __init__(self, ranks: RankTable, world_size: int | None) -> None:
        self.ranks = ranks
        self.world_size = world_size  # --world-size, if given
        self._next = 0.0
        self._marked: list[Peer] = []
        self._reported: set[object] = set()

    def check(self, now: float) -> list[Event]:
        if now < self._next:
            return []
        self._next = now + _CHECK_EVERY
        if len(self._reported) > _REPORTED_KEPT:
            self._reported.clear()
        for peer in self._marked:
            peer.mistake = ""
        self._marked = []
        return self._duplicates() + self._world_sizes()

    def _mark(self, peer: Peer, mistake: str) -> None:
        peer.mistake = "; ".join(filter(None, (peer.mistake, mistake)))
        self._marked.append(peer)

    def _duplicates(self) -> list[Event]:
        claims: dict[tuple[str, int], list[Peer]] = {}
        for peer in self.ranks:
            if peer.live and not peer.silent and not peer.finished:
                claims.setdefault((peer.job, peer.rank), []).append(peer)
        events = []
        for (job, rank), peers in claims.items():
            if len(peers) < 2:
                continue
            joined = max(peer.joined_at for peer in peers)  # the newest claim
            alive = [p for p in peers if p.last_seen >= joined + BOTH_HEARD]
            if len(alive) < 2:
                continue
            for peer in alive:
                others = ", ".join(f"{p.host} pid {p.pid}" for p in alive if p is not peer)
                self._mark(peer, f"rank {rank} twice: also {others}")
            key = ("duplicate", job, rank, frozenset(p.incarnation for p in alive))
            if key in self._reported:
                continue
            self._reported.add(key)
            who = " and ".join(f"host {p.host} pid {p.pid}" for p in alive)
            _log.warning(
                "two live processes claim rank %d of job %s: %s; their records land in one "
                "file, interleaved. Was a rank or a node started twice?",
                rank, job, who,
            )  # fmt: skip
            processes = [[p.host, p.pid, p.incarnation] for p in alive]
            events.append(event("rank_claimed_twice", run=job, rank=rank, processes=processes))
        return events

    def _world_sizes(self) -> list[Event]:
        sizes = world_sizes(self.ranks)
        expected = self.world_size
        if len(sizes) < 2 and (not sizes or expected is None or expected in sizes):
            return []
        _, job = current_job(self.ranks)
        for peer in job.values():
            if len(sizes) > 1:
                self._mark(peer, f"world size {peer.world_size}; ranks disagree")
            else:
                self._mark(peer, f"world size {peer.world_size}, not --world-size {expected}")
        key = ("world-size", expected, tuple(sorted(sizes)))  # once, however many ranks join
        if key in self._reported:
            return []
        self._reported.add(key)
        reported = {size: members for size, members in sorted(sizes.items())}
        if len(sizes) > 1:
            largest = max(max(sizes), expected or 0)
            _log.warning(
                "the ranks disagree on the world size: %s%s; --exit-when-done waits for %d "
                "ranks until they agree",
                disagreement(self.ranks),
                "" if expected is None else f" (--world-size {expected})",
                largest,
            )
        else:
            (size,) = sizes
            _log.warning(
                "the ranks report world size %d, not --world-size %d; the exit rule follows "
                "the ranks (done when ranks 0..%d are)",
                size, expected, size - 1,
            )  # fmt: skip
        return [event("world_size_mismatch", expected=expected,
                      reported={str(s): r for s, r in reported.items()})]  # fmt: skip


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8]))
    more = f" and {len(ranks) - 8} more" if len(ranks) > 8 else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}{more}"

"""The collector's view of the ranks: one entry per rank incarnation, its accepted seqs
(transport de-duplication), liveness and progress."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ranklog.collector.cadence import Cadence

if TYPE_CHECKING:
    from ranklog.envelope import Message


class SeqTracker:
    """Accepted seqs of one (job, rank, incarnation): a contiguous prefix plus stragglers.

    ``contiguous`` is the highest seq such that every seq up to it was accepted, or given up
    by the rank (its reported ``base`` says nothing below it will come again). That is the
    number the collector acknowledges.
    """

    def __init__(self) -> None:
        self.contiguous = 0
        self._above: set[int] = set()

    def seen(self, seq: int) -> bool:
        """Was ``seq`` accepted (or given up) already?"""
        return seq <= self.contiguous or seq in self._above

    def accept(self, seq: int) -> bool:
        """Record ``seq``; False if it was accepted before (a retransmit)."""
        if seq == self.contiguous + 1 and not self._above:  # in order: the usual case
            self.contiguous = seq
            return True
        if seq <= self.contiguous or seq in self._above:
            return False
        self._above.add(seq)
        self._advance()
        return True

    def skip_below(self, base: int) -> None:
        """The rank holds nothing below ``base`` any more: stop waiting for those seqs."""
        if base - 1 > self.contiguous:
            self.contiguous = base - 1
            self._above = {seq for seq in self._above if seq > self.contiguous}
            self._advance()

    def _advance(self) -> None:
        while self.contiguous + 1 in self._above:
            self.contiguous += 1
            self._above.discard(self.contiguous)

    def to_state(self) -> list[Any]:
        """``[contiguous, [stragglers]]``: what a snapshot keeps."""
        return [self.contiguous, sorted(self._above)]

    @classmethod
    def from_state(cls, state: list[Any]) -> SeqTracker:
        tracker = cls()
        tracker.contiguous = int(state[0])
        tracker._above = {int(seq) for seq in state[1]}
        return tracker


PeerKey = tuple[str, int, str]  # (job, rank, incarnation)


def peer_key(message: Message) -> PeerKey:
    """The key of the rank incarnation that sent (or is acknowledged by) ``message``."""
    return (message.run, message.rank, message.inc)


# Incarnations the table holds: about 2 KB each. Past this, the one to go is one from an
# earlier collector run or silent, else one that never sent a record, else the one heard
# longest ago: a made-up flood evicts itself, and a real rank always gets in.
MAX_INCARNATIONS = 65_536


@dataclass(slots=True)
class Peer:
    """One rank incarnation: what it sent, when it was last heard, how it ended."""

    rank: int
    world_size: int
    host: str
    pid: int
    tracker: SeqTracker = field(default_factory=SeqTracker)
    last_seen: float = 0.0
    goodbye_seq: int | None = None
    dropped: int = 0
    converted: int = 0
    resent: int = 0  # records the rank sent again (its heartbeats' ``resent``), if it says
    spilled: int = 0  # records its goodbye says it left in a spill file (ingested later)
    last_step: int | None = None
    silent: bool = False
    job: str = ""  # the job id: set by RankTable.add from the key
    progress: Cadence = field(default_factory=Cadence)
    # Heard by this collector run, not only read back from the journal: an earlier job's
    # ranks (whose goodbyes the journal still holds) never decide when this job is done.
    live: bool = False
    recorded: bool = False  # sent a record or a goodbye (else the first to be evicted)
    incarnation: str = ""  # set by RankTable.add from the key
    joined_at: float = 0.0  # when this collector run first heard it
    mistake: str = ""  # a launch mistake it is part of (ranklog.collector.launch), if any

    @property
    def finished(self) -> bool:
        """Said goodbye, and everything before the goodbye arrived or was spilled (the
        spilled seqs stay unaccepted: the spill file brings them later, once)."""
        if self.goodbye_seq is None:
            return False
        return self.spilled > 0 or self.tracker.contiguous >= self.goodbye_seq


class RankTable:
    """Every incarnation seen (at most ``capacity``), indexed by key and by rank, least
    recently heard first."""

    def __init__(self, capacity: int = MAX_INCARNATIONS) -> None:
        self.capacity = capacity
        self._peers: OrderedDict[PeerKey, Peer] = OrderedDict()
        self._by_rank: dict[int, dict[PeerKey, Peer]] = {}
        # Incarnations that had sent no record when added, least recently heard first (one
        # that sent records since is skipped when it comes up for eviction).
        self._fresh: OrderedDict[PeerKey, None] = OrderedDict()
        self.evicted = 0  # incarnations evicted to make room, in all
        # Metric names whose latest value every incarnation keeps (shared with each Cadence).
        self.watched: list[str] = []

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._peers.values())

    def get(self, key: PeerKey) -> Peer | None:
        return self._peers.get(key)

    def add(self, key: PeerKey, peer: Peer) -> Peer:
        """Add ``peer`` as the most recently heard, evicting one if the table is full."""
        while len(self._peers) >= self.capacity:
            self._evict(self._victim())
        peer.job, peer.incarnation = key[0], key[2]
        peer.progress.watched = self.watched
        self._peers[key] = peer
        self._by_rank.setdefault(peer.rank, {})[key] = peer
        if not peer.recorded:
            self._fresh[key] = None
        return peer

    def heard(self, key: PeerKey) -> None:
        """``key`` was just heard: it is the last to be evicted."""
        self._peers.move_to_end(key)
        if key in self._fresh:
            self._fresh.move_to_end(key)

    def _victim(self) -> PeerKey:
        oldest_key, oldest = next(iter(self._peers.items()))
        if not oldest.live or oldest.silent:  # an earlier run's, or gone
            return oldest_key
        while self._fresh:
            key = next(iter(self._fresh))
            peer = self._peers.get(key)
            if peer is not None and not peer.recorded:
                return key
            del self._fresh[key]
        return oldest_key

    def _evict(self, key: PeerKey) -> None:
        peer = self._peers.pop(key)
        self._fresh.pop(key, None)
        same_rank = self._by_rank[peer.rank]
        del same_rank[key]
        if not same_rank:
            del self._by_rank[peer.rank]
        self.evicted += 1

    def to_state(self) -> list[list[Any]]:
        """Every incarnation, as a de-duplication snapshot keeps it: key, identity, accepted
        seqs, goodbye, counters, last step (not liveness: that is this run's)."""
        return [
            [*key, peer.world_size, peer.host, peer.pid, peer.tracker.to_state(),
             peer.goodbye_seq, peer.dropped, peer.converted, peer.last_step]
            for key, peer in self._peers.items()
        ]  # fmt: skip

    @classmethod
    def from_state(cls, rows: list[list[Any]], now: float) -> RankTable:
        """The table a snapshot kept; each incarnation last seen ``now``, not live."""
        table = cls()
        for row in rows:
            job, rank, incarnation, world_size, host, pid = row[:6]
            seqs, goodbye, dropped, converted, step = row[6:]
            peer = Peer(rank=rank, world_size=world_size, host=host, pid=pid, last_seen=now,
                        recorded=True)  # fmt: skip
            peer.tracker = SeqTracker.from_state(seqs)
            peer.goodbye_seq, peer.last_step = goodbye, step
            peer.dropped, peer.converted = dropped, converted
            table.add((job, rank, incarnation), peer)
        return table

    def resume_latest_job(self) -> str | None:
        """A killed collector's job goes on in this run: its incarnations (the job heard
        last) count as heard here, goodbyes included. Returns that job."""
        if not self._peers:
            return None
        latest = next(reversed(self._peers.values())).job
        for peer in self._peers.values():
            if peer.job == latest:
                peer.live = True
        return latest

    def newly_silent(self, now: float, timeout: float) -> list[Peer]:
        """Peers unheard for ``timeout`` seconds that were not yet reported; marks them."""
        found = []
        for peer in self._peers.values():
            if not peer.finished and not peer.silent and now - peer.last_seen >= timeout:
                peer.silent = True
                found.append(peer)
        return found

    def _live(self, rank: int) -> list[Peer]:
        return [peer for peer in self._by_rank.get(rank, {}).values() if peer.live]

    def all_done(
        self,
        world_size: int,
        now: float,
        since: float,
        timeout: float,
        connect_timeout: float | None = None,
    ) -> bool:
        """Has each of ranks 0..world_size-1, as heard in this run, finished or been silent
        for ``timeout`` seconds? A rank never heard counts as gone only ``connect_timeout``
        seconds after ``since`` (never, with None)."""
        for rank in range(world_size):
            peers = self._live(rank)
            if any(peer.finished for peer in peers):
                continue
            if not peers:
                if connect_timeout is None or now - since < connect_timeout:
                    return False
                continue
            if now - max(peer.last_seen for peer in peers) < timeout:
                return False
        return True

    def never_seen(self, world_size: int) -> list[int]:
        """Ranks below ``world_size`` not heard in this run."""
        return [rank for rank in range(world_size) if not self._live(rank)]

    def largest_world_size(self) -> int:
        return max((peer.world_size for peer in self._peers.values()), default=1)

    def status(self) -> str:
        """Ranks, finished/silent counts, last steps, lag behind the leading rank, drops."""
        latest: dict[int, Peer] = {}
        for peer in self._peers.values():
            if peer.rank not in latest or peer.last_seen > latest[peer.rank].last_seen:
                latest[peer.rank] = peer
        steps = {r: p.last_step for r, p in sorted(latest.items()) if p.last_step is not None}
        lead = max(steps.values(), default=0)
        lagging = {rank: lead - step for rank, step in steps.items() if step < lead}
        shown = (
            str(steps)
            if len(steps) <= 8
            else (f"{min(steps.values())}..{lead} over {len(steps)} ranks")
        )
        return (
            f"ranks {len(latest)} ({sum(p.finished for p in latest.values())} finished, "
            f"{sum(p.silent for p in latest.values())} silent); last steps {shown}, "
            f"lag behind step {lead}: {lagging or 'none'}; "
            f"rank-side drops {sum(p.dropped for p in self._peers.values())}, "
            f"resends {sum(p.resent for p in self._peers.values())}"
        )

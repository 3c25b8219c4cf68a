"""The receive step: frames in, what to journal and what to acknowledge out. No sockets.

>>> received = receive([(b"route", [frame])], ranks, stats, now)  # doctest: +SKIP
>>> journal_them(received.frames); received.apply(stats); send(received.acks())  # doctest: +SKIP

:func:`receive` decodes and validates each frame (:func:`ranklog.wire.decode_message`, into
the static types of ``ranklog.envelope``), rejects what
is not a valid envelope with a counted reason, and de-duplicates records and goodbyes by
(job, rank, incarnation, seq). Once the accepted frames are durable, :meth:`Received.apply`
accounts for them, and :meth:`Received.acks` says, per route, how far each rank is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ranklog.collector.events import Event, event
from ranklog.collector.peers import Peer, PeerKey, RankTable, peer_key
from ranklog.collector.stats import CollectorStats
from ranklog.envelope import (
    AckEnvelope,
    AnyRecord,
    FromRank,
    GoodbyeEnvelope,
    HeartbeatEnvelope,
    HelloEnvelope,
)
from ranklog.errors import ProtocolError
from ranklog.wire import decode_message, pack_ack

_log = logging.getLogger(__name__)

__all__ = ["CollectorStats", "Message", "Received", "account", "receive", "recover"]

Message = tuple[bytes, Sequence[bytes]]  # (ROUTER route, the message's frames)


@dataclass
class Received:
    """What one batch of messages brought: new records and goodbyes, the routes to
    acknowledge, and the events to note."""

    accepted: list[tuple[Peer, AnyRecord | GoodbyeEnvelope, bytes]] = field(default_factory=list)
    routes: dict[tuple[bytes, PeerKey], Peer] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    # Per incarnation, the highest seq received but not kept (the journal could not take
    # it): the acks say so, and the rank sends everything after its ack again.
    refused: dict[PeerKey, int] = field(default_factory=dict)
    _seen: set[tuple[PeerKey, int]] = field(default_factory=set)
    # The (route, key) and peer of the frame before: the next frame of a message is most
    # likely from the same rank, which is then known, live and routed already.
    _last: tuple[tuple[bytes, PeerKey] | None, Peer | None] = (None, None)

    @property
    def records(self) -> int:
        """The accepted records, not counting goodbyes."""
        return sum(type(message) is not GoodbyeEnvelope for _, message, _ in self.accepted)

    @property
    def frames(self) -> list[bytes]:
        """The frames to journal, in order."""
        return [frame for _, _, frame in self.accepted]

    def apply(self, stats: CollectorStats) -> None:
        """Account for the accepted frames, once they are durable."""
        for peer, message, _ in self.accepted:
            try:
                self.events.extend(account(peer, message, stats))
            except Exception:  # one bad record must never stop the others
                stats.rejected(
                    "internal-error",
                    "error while applying a record; it was skipped",
                    exc_info=True,
                    level=logging.ERROR,
                )

    def refuse(self) -> None:
        """Accept nothing of this batch (the journal could not take it); the acks tell each
        rank what it must send again.

        Except a goodbye that says its rank spilled: that rank sends nothing again (it gave
        up, its records are in its spill file), so it counts as finished now, and a full
        disk does not keep the collector waiting for its silence after the job ended."""
        for peer, message, _ in self.accepted:
            if isinstance(message, GoodbyeEnvelope) and message.spilled:
                self.events.extend(account(peer, message, CollectorStats()))
                continue
            key = peer_key(message)
            self.refused[key] = max(self.refused.get(key, 0), message.seq)
        self.accepted = []

    def acks(self) -> list[tuple[bytes, bytes]]:
        """``(route, ack frame)`` per rank incarnation heard from: its contiguous seq."""
        refused = self.refused
        return [
            (route, pack_ack(*key, peer.tracker.contiguous, refused.get(key)))
            for (route, key), peer in self.routes.items()
        ]


def receive(
    messages: Iterable[Message], ranks: RankTable, stats: CollectorStats, now: float
) -> Received:
    """Decode, validate and de-duplicate every frame of ``messages``; add the incarnations
    first heard to ``ranks`` and count rejections and duplicates in ``stats``."""
    received = Received()
    for route, frames in messages:
        for frame in frames:
            try:
                _receive_frame(route, frame, ranks, stats, now, received)
            except ProtocolError as exc:
                stats.rejected(
                    exc.reason,
                    "rejected a frame (%s); further ones of this kind are only counted",
                    exc,
                )
            except Exception as exc:  # a bug must cost one frame, never the collector
                stats.rejected(
                    "internal-error",
                    "error while handling a frame (%s: %s); it was dropped",
                    type(exc).__name__,
                    exc,
                    exc_info=True,
                    level=logging.ERROR,
                )
    received.events.extend(stats.joins.tick(ranks, now))
    return received


def _receive_frame(
    route: bytes, frame: bytes, ranks: RankTable, stats: CollectorStats, now: float, into: Received
) -> None:
    message = decode_message(frame)
    if isinstance(message, AckEnvelope):
        raise ProtocolError("unexpected-kind", "a rank sent an ack")
    key = peer_key(message)
    routed, peer = into._last
    if routed is None or routed[1] != key or routed[0] != route:
        peer = _heard(route, key, message, ranks, stats, now, into)
    assert peer is not None
    if isinstance(message, (HelloEnvelope, HeartbeatEnvelope)):
        _note_counters(peer, message)
        return
    seq = message.seq
    if peer.tracker.seen(seq) or (key, seq) in into._seen:
        stats.duplicates += 1
        return
    into._seen.add((key, seq))
    into.accepted.append((peer, message, frame))


def _heard(
    route: bytes,
    key: PeerKey,
    message: FromRank,
    ranks: RankTable,
    stats: CollectorStats,
    now: float,
    into: Received,
) -> Peer:
    """The peer of ``key`` (added if new, evicting another if the table is full), live and
    routed."""
    peer = ranks.get(key)
    if peer is None:
        peer = ranks.add(key, _new_peer(message))
        peer.joined_at = now
        stats.joins.joined(peer)
    else:
        ranks.heard(key)
    if peer.silent:
        peer.silent = False
        _log.warning("rank %d (host %s, pid %d) is heard again after its silence",
                     peer.rank, peer.host, peer.pid)  # fmt: skip
        into.events.append(event("rank_resumed", rank=peer.rank, pid=peer.pid))
    peer.last_seen = now
    peer.live = True
    into.routes[(route, key)] = peer
    into._last = ((route, key), peer)
    return peer


def _new_peer(message: FromRank) -> Peer:
    return Peer(
        rank=message.rank, world_size=message.world_size, host=message.host, pid=message.pid
    )


def _note_counters(
    peer: Peer, message: HelloEnvelope | HeartbeatEnvelope | GoodbyeEnvelope
) -> None:
    peer.dropped = max(peer.dropped, message.dropped)
    peer.converted = max(peer.converted, message.converted)
    peer.resent = max(peer.resent, message.resent)  # 0 from ranks that do not report it
    if isinstance(message, GoodbyeEnvelope) and message.spilled > peer.spilled:
        peer.spilled = message.spilled
    peer.tracker.skip_below(message.base)


def account(
    peer: Peer, message: AnyRecord | GoodbyeEnvelope, stats: CollectorStats, *, live: bool = True
) -> list[Event]:
    """Account for one journaled record or goodbye (live, or read back after a restart).
    The backends read the record itself from the journal."""
    peer.tracker.accept(message.seq)
    peer.recorded = True
    if not isinstance(message, GoodbyeEnvelope):
        stats.accepted += 1
        if message.step is not None:
            peer.last_step = message.step
        if live:
            peer.progress.record(message, peer.last_seen)
        return []
    peer.goodbye_seq = message.seq
    _note_counters(peer, message)
    if not live:
        return []
    _log.info(
        "rank %d said goodbye (%d dropped on the rank, %d values sent as repr)",
        peer.rank,
        peer.dropped,
        peer.converted,
    )
    return [event("rank_finished", rank=peer.rank, pid=peer.pid, dropped=peer.dropped)]


def recover(frames: Iterable[bytes], ranks: RankTable, stats: CollectorStats, now: float) -> int:
    """Account for frames read back from the journal: every seq accepted before. Returns
    how many there were."""
    total = 0
    for frame in frames:
        try:
            message = decode_message(frame)
        except ProtocolError:
            continue
        if isinstance(message, (HelloEnvelope, HeartbeatEnvelope, AckEnvelope)):
            continue  # the journal holds records and goodbyes only
        key = peer_key(message)
        peer = ranks.get(key)
        if peer is None:
            peer = ranks.add(key, _new_peer(message))
            peer.last_seen = now
        account(peer, message, stats, live=False)
        total += 1
    return total

"""The receive step: frames in, what to journal and what to acknowledge out. No sockets.

>>> received = receive([(b"route", [frame])], ranks, stats, now)  # doctest: +SKIP
>>> journal_them(received.frames); received.apply(stats); send(received.acks())  # doctest: +SKIP

:func:`receive` decodes and validates each frame (:func:`ranklog.wire.decode`), rejects what
is not a valid envelope with a counted reason, and de-duplicates records and goodbyes by
(run, rank, incarnation, seq). Once the accepted frames are durable, :meth:`Received.apply`
accounts for them, and :meth:`Received.acks` says, per route, how far each rank is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ranklog.collector.events import Event, event
from ranklog.collector.peers import Peer, PeerKey, RankTable
from ranklog.collector.stats import CollectorStats
from ranklog.errors import ProtocolError
from ranklog.wire import ACK, GOODBYE, RECORD, decode, pack_ack

_log = logging.getLogger(__name__)

__all__ = ["CollectorStats", "Message", "Received", "account", "receive", "recover"]

Message = tuple[bytes, Sequence[bytes]]  # (ROUTER route, the message's frames)


@dataclass
class Received:
    """What one batch of messages brought: new records and goodbyes, the routes to
    acknowledge, and the events to note."""

    accepted: list[tuple[Peer, dict[str, Any], bytes]] = field(default_factory=list)
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
        return sum(envelope["kind"] == RECORD for _, envelope, _ in self.accepted)

    @property
    def frames(self) -> list[bytes]:
        """The frames to journal, in order."""
        return [frame for _, _, frame in self.accepted]

    def apply(self, stats: CollectorStats) -> None:
        """Account for the accepted frames, once they are durable."""
        for peer, envelope, _ in self.accepted:
            try:
                self.events.extend(account(peer, envelope, stats))
            except Exception:  # one bad record must never stop the others
                stats.rejected(
                    "internal-error",
                    "error while applying a record; it was skipped",
                    exc_info=True,
                    level=logging.ERROR,
                )

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
    envelope = decode(frame)
    kind = envelope["kind"]
    if kind == ACK:
        raise ProtocolError("unexpected-kind", "a rank sent an ack")
    key = (envelope["run"], envelope["rank"], envelope["inc"])
    routed, peer = into._last
    if routed is None or routed[1] != key or routed[0] != route:
        peer = _heard(route, key, envelope, ranks, stats, now, into)
    assert peer is not None
    if kind in (RECORD, GOODBYE):
        seq = envelope["seq"]
        if peer.tracker.seen(seq) or (key, seq) in into._seen:
            stats.duplicates += 1
            return
        into._seen.add((key, seq))
        into.accepted.append((peer, envelope, frame))
    else:
        _note_counters(peer, envelope)


def _heard(
    route: bytes,
    key: PeerKey,
    envelope: dict[str, Any],
    ranks: RankTable,
    stats: CollectorStats,
    now: float,
    into: Received,
) -> Peer:
    """The peer of ``key`` (added if new, evicting another if the table is full), live and
    routed."""
    peer = ranks.get(key)
    if peer is None:
        peer = ranks.add(key, _new_peer(envelope))
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


def _new_peer(envelope: dict[str, Any]) -> Peer:
    return Peer(
        rank=envelope["rank"],
        world_size=envelope["world_size"],
        host=envelope["host"],
        pid=envelope["pid"],
    )


def _note_counters(peer: Peer, envelope: dict[str, Any]) -> None:
    peer.dropped = max(peer.dropped, envelope["dropped"])
    peer.converted = max(peer.converted, envelope["converted"])
    resent = envelope.get("resent", 0)  # from ranks that report it
    if type(resent) is int:
        peer.resent = max(peer.resent, resent)
    spilled = envelope.get("spilled", 0)  # a goodbye's
    if type(spilled) is int and spilled > peer.spilled:
        peer.spilled = spilled
    peer.tracker.skip_below(envelope["base"])


def account(
    peer: Peer, envelope: dict[str, Any], stats: CollectorStats, *, live: bool = True
) -> list[Event]:
    """Account for one journaled record or goodbye (live, or read back after a restart).
    The backends read the record itself from the journal."""
    peer.tracker.accept(envelope["seq"])
    peer.recorded = True
    if envelope["kind"] == RECORD:
        stats.accepted += 1
        if envelope["step"] is not None:
            peer.last_step = envelope["step"]
        if live:
            peer.progress.record(envelope, peer.last_seen)
        return []
    peer.goodbye_seq = envelope["seq"]
    _note_counters(peer, envelope)
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
            envelope = decode(frame)
        except ProtocolError:
            continue
        key = (envelope["run"], envelope["rank"], envelope["inc"])
        peer = ranks.get(key)
        if peer is None:
            peer = ranks.add(key, _new_peer(envelope))
            peer.last_seen = now
        account(peer, envelope, stats, live=False)
        total += 1
    return total

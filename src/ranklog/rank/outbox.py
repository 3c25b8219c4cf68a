"""The rank's bounded store of records not yet acknowledged by the collector.

Callers put packed records in; the sender thread takes batches out, marks them in flight,
and drops them once the collector acknowledges their seq. When the store is full the oldest
record goes, whether sent or not, and is counted: training never waits for logging.

A record may also arrive not yet packed (its CUDA values still on the way to host memory,
see :class:`ranklog.rank.values.DeferredRecord`). It keeps its place in seq order, and batches stop
in front of it until its bytes are ready, so acknowledgements stay a contiguous prefix.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol


class Pending(Protocol):
    """A record whose bytes are not known yet; ``result()`` never blocks."""

    @property
    def nbytes(self) -> int: ...

    def result(self) -> bytes | None: ...


Item = tuple[int, "bytes | Pending"]


class Outbox:
    """Records ``(seq, bytes)`` between ``put`` and acknowledgement, bounded in count and bytes.

    ``on_ack``, if set, is called (on the sender thread, outside the lock) with the seq
    acknowledged whenever an acknowledgement releases records: a hook for measuring latency.
    """

    def __init__(self, max_records: int, max_bytes: int) -> None:
        if max_records < 1 or max_bytes < 1:
            raise ValueError("Outbox bounds must be positive")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.dropped = 0
        self.resent = 0  # records taken again after a requeue (sent more than once)
        self._sent_through = 0  # the highest seq ever taken
        self._undo = (0, 0)  # both of those before the last take
        self.on_ack: Callable[[int], None] | None = None
        # Reentrant: the signal handler (ranklog.rank.signals) reads the outbox on the main
        # thread, which may hold the lock at that moment.
        self._lock = threading.RLock()
        self._unsent: deque[Item] = deque()
        self._inflight: deque[tuple[int, bytes]] = deque()
        self._oldest_send = 0.0
        # (last seq, sent at) of each batch in flight, and how long acknowledgements have been
        # taking: a collector that is slow but alive is not made to take everything twice.
        self._batches: deque[tuple[int, float]] = deque()
        self._ack_time = 0.0
        self._nbytes = 0
        self._next_seq = 1

    def put(self, seq: int, data: bytes | Pending, *, bounded: bool = True) -> None:
        """Add a record; evict the oldest ones while over a bound. A goodbye is put
        unbounded: it must not push out (and count as dropped) a record already spilled."""
        size = len(data) if isinstance(data, bytes) else data.nbytes
        with self._lock:
            self._unsent.append((seq, data))
            self._nbytes += size
            if seq >= self._next_seq:
                self._next_seq = seq + 1
            if bounded and (
                self._nbytes > self.max_bytes
                or len(self._unsent) + len(self._inflight) > self.max_records
            ):
                self._evict()

    def _evict(self) -> None:
        while (
            len(self._unsent) + len(self._inflight) > self.max_records
            or self._nbytes > self.max_bytes
        ):
            _, old = (self._inflight or self._unsent).popleft()
            self._nbytes -= _size(old)
            self.dropped += 1

    def take(self, max_records: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Move up to a batch of unsent records in flight and return them.

        The batch ends early in front of a record whose bytes are not ready yet.
        """
        batch: list[tuple[int, bytes]] = []
        size = 0
        with self._lock:
            unsent = self._unsent
            while unsent and len(batch) < max_records and size < max_bytes:
                seq, data = unsent[0]
                if not isinstance(data, bytes):
                    ready = data.result()
                    if ready is None:
                        break
                    self._nbytes += len(ready) - data.nbytes
                    data = ready
                unsent.popleft()
                batch.append((seq, data))
                size += len(data)
            if batch:
                self._undo = (self._sent_through, self.resent)
                if batch[0][0] <= self._sent_through:
                    self.resent += sum(1 for seq, _ in batch if seq <= self._sent_through)
                self._sent_through = max(self._sent_through, batch[-1][0])
                now = time.monotonic()
                if not self._inflight:
                    self._oldest_send = now
                self._batches.append((batch[-1][0], now))
            self._inflight.extend(batch)
        return batch

    def unsend(self, batch: list[tuple[int, bytes]]) -> None:
        """Undo the last ``take`` (the socket would not take the batch)."""
        with self._lock:
            for _ in range(min(len(batch), len(self._inflight))):
                self._unsent.appendleft(self._inflight.pop())
            if batch and self._batches:
                self._batches.pop()
                self._sent_through, self.resent = self._undo

    def ack(self, seq: int) -> bool:
        """The collector holds every record up to ``seq``: forget them. True if that
        released records in flight."""
        with self._lock:
            acked = False
            while self._inflight and self._inflight[0][0] <= seq:
                self._nbytes -= len(self._inflight.popleft()[1])
                acked = True
            while self._unsent and self._unsent[0][0] <= seq:
                self._nbytes -= _size(self._unsent.popleft()[1])
            if acked:
                now = self._oldest_send = time.monotonic()
                while self._batches and self._batches[0][0] <= seq:
                    took = now - self._batches.popleft()[1]
                    # Rise at once, settle slowly.
                    self._ack_time = max(took, 0.875 * self._ack_time + 0.125 * took)
        if acked and self.on_ack is not None:
            self.on_ack(seq)
        return acked

    def requeue(self, stale_after: float = 0.0) -> int:
        """Put every in-flight record back in front of the unsent ones, to be sent again.

        With ``stale_after``, only if nothing was acknowledged for that many seconds, or for
        three times as long as acknowledgements have lately taken (up to ten times
        ``stale_after``), whichever is longer.
        """
        with self._lock:
            patience = min(max(stale_after, 3 * self._ack_time), 10 * stale_after)
            if not self._inflight or time.monotonic() - self._oldest_send < patience:
                return 0
            count = len(self._inflight)
            self._unsent.extendleft(reversed(self._inflight))
            self._inflight.clear()
            self._batches.clear()
            return count

    def held(self) -> list[Item]:
        """Every record held, sent or not, in seq order."""
        with self._lock:
            return [*self._inflight, *self._unsent]

    @property
    def sent_at(self) -> float:
        """When the oldest record in flight went out, or the last acknowledgement came."""
        return self._oldest_send

    @property
    def ack_time(self) -> float:
        """How long acknowledgements have lately taken (seconds; rises at once, settles
        slowly)."""
        return self._ack_time

    def base(self) -> int:
        """Lowest seq still held; everything below it was acknowledged or dropped."""
        with self._lock:
            for queue in (self._inflight, self._unsent):
                if queue:
                    return queue[0][0]
            return self._next_seq

    def pending(self) -> int:
        """Records held, sent or not."""
        with self._lock:
            return len(self._unsent) + len(self._inflight)

    def has_unsent(self) -> bool:
        return bool(self._unsent)

    def in_flight(self) -> int:
        """Records sent and not yet acknowledged."""
        return len(self._inflight)


def _size(data: bytes | Pending) -> int:
    return len(data) if isinstance(data, bytes) else data.nbytes

"""``ZMQSocketHandler``: the per-rank logging handler.

The caller's thread only builds the envelope, packs it and appends the bytes to a bounded
outbox. A sender thread owns the DEALER socket: it sends batches, reads acknowledgements,
resends what was not acknowledged in time, and says hello, heartbeat and goodbye.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from ranklog._codec import ACK, GOODBYE, HEARTBEAT, HELLO, RecordEncoder
from ranklog._endpoint import derived_endpoint
from ranklog._identity import RankIdentity, detect_identity, new_incarnation
from ranklog._outbox import Outbox

_live_handlers: weakref.WeakSet[ZMQSocketHandler] = weakref.WeakSet()


def _reset_handlers_in_child() -> None:
    for handler in list(_live_handlers):
        handler._after_fork()


os.register_at_fork(after_in_child=_reset_handlers_in_child)


@dataclass
class SenderSettings:
    """Timing and batching of the sender thread."""

    poll_interval: float = 0.005
    heartbeat_interval: float = 1.0
    ack_timeout: float = 2.0
    batch_records: int = 512
    batch_bytes: int = 1 << 20


class ZMQSocketHandler(logging.Handler):
    """Send each record to a ranklog collector over ZeroMQ; never block, never raise.

    >>> handler = ZMQSocketHandler("tcp://127.0.0.1:5555")          # doctest: +SKIP
    >>> logging.getLogger("instructlab.training.metrics").addHandler(handler)  # doctest: +SKIP

    ``endpoint`` defaults to ``RANKLOG_ENDPOINT``, else the address every rank of the job
    derives alike (see :func:`ranklog._endpoint.derived_endpoint`). Rank fields default to
    torchrun's environment, then ``torch.distributed``, then 0/1. At most ``max_records``
    records / ``max_bytes`` bytes wait for acknowledgement; beyond that the oldest are
    dropped and counted. ``close()`` waits up to ``close_timeout`` seconds for everything to
    be acknowledged and warns about what was not.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        level: int | str = logging.NOTSET,
        rank: int | None = None,
        local_rank: int | None = None,
        world_size: int | None = None,
        run_id: str | None = None,
        max_records: int = 100_000,
        max_bytes: int = 256 << 20,
        close_timeout: float = 5.0,
        settings: SenderSettings | None = None,
    ) -> None:
        super().__init__(level)
        self.identity: RankIdentity = detect_identity(
            rank=rank, local_rank=local_rank, world_size=world_size, run_id=run_id
        )
        self.endpoint = endpoint or derived_endpoint(self.identity)
        self.close_timeout = close_timeout
        self.settings = settings or SenderSettings()
        self._bounds = (max_records, max_bytes)
        self._start_lock = threading.Lock()
        self._fresh_state()
        _live_handlers.add(self)

    def _fresh_state(self) -> None:
        self.outbox = Outbox(*self._bounds)
        self._encoder = RecordEncoder(self.identity)
        self._seq = itertools.count(1)
        self._sender: _Sender | None = None
        self._closed = False
        # Once a flush has waited in vain, close() only tries to say goodbye.
        self.close_budget = self.close_timeout

    def _after_fork(self) -> None:
        # The child must not touch the parent's context or thread; the parent still sends
        # what it buffered. The child is a new incarnation with its own seq space.
        self.identity = RankIdentity(
            **{**vars(self.identity), "pid": os.getpid(), "incarnation": new_incarnation()}
        )
        self._start_lock = threading.Lock()
        self._fresh_state()
        self.createLock()

    def _ensure_sender(self) -> _Sender:
        with self._start_lock:
            if self._sender is None:
                self._sender = _Sender(self)
                self._sender.start()
            return self._sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._sender is None:
                if self._closed:
                    return
                self._ensure_sender()
            seq = next(self._seq)
            self.outbox.put(seq, self._encoder.record(seq, record))
        except Exception:
            self.handleError(record)

    def start(self) -> None:
        """Connect and say hello now rather than at the first record."""
        if not self._closed:
            self._ensure_sender()

    @property
    def stats(self) -> dict[str, int]:
        """Counters a user can check: held (not yet acknowledged), dropped, converted."""
        return {
            "held": self.outbox.pending(),
            "dropped": self.outbox.dropped,
            "converted": self._encoder.converted,
        }

    def flush(self) -> None:
        """Wait (up to ``close_timeout``) until everything emitted is acknowledged."""
        sender = self._sender
        deadline = time.monotonic() + self.close_timeout
        while sender is not None and sender.is_alive() and self.outbox.pending():
            if time.monotonic() > deadline:
                self.close_budget = min(self.close_timeout, 0.5)
                return
            time.sleep(0.005)

    def close(self) -> None:
        """Flush, say goodbye, stop the sender, and warn about anything not delivered."""
        sender = self._sender
        if sender is not None and not self._closed:
            self._closed = True
            seq = next(self._seq)
            goodbye = self._encoder.control(
                GOODBYE,
                seq=seq,
                base=self.outbox.base(),
                dropped=self.outbox.dropped,
                converted=self._encoder.converted,
            )
            self.outbox.put(seq, goodbye)
            sender.closing.set()
            sender.join(self.close_budget + 2.0)
            self._report_losses()
        self._closed = True
        super().close()

    def _report_losses(self) -> None:
        undelivered = self.outbox.pending()
        dropped = self.outbox.dropped
        if undelivered or dropped:
            warnings.warn(
                f"ranklog: rank {self.identity.rank} could not deliver {undelivered} "
                f"message(s) to {self.endpoint} within {self.close_timeout:g}s, and dropped "
                f"{dropped} record(s) because its buffer was full; is the collector running?",
                RuntimeWarning,
                stacklevel=3,
            )


class _Sender(threading.Thread):
    """Owns the DEALER socket of one handler incarnation."""

    def __init__(self, handler: ZMQSocketHandler) -> None:
        super().__init__(name=f"ranklog-sender-{handler.identity.rank}", daemon=True)
        self.handler = handler
        self.outbox = handler.outbox
        self.closing = threading.Event()
        # Control envelopes are packed here, on this thread, with an encoder of its own.
        self._encoder = RecordEncoder(handler.identity)
        self._incarnation = handler.identity.incarnation

    def run(self) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # Queue only on live connections: while no collector answers, records wait in the
            # outbox, where they are bounded, counted and resent.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(self.handler.endpoint)
            self._loop(sock)
        finally:
            sock.close(linger=0)
            context.term()

    def _loop(self, sock: zmq.Socket[Any]) -> None:
        settings = self.handler.settings
        poll_ms = max(1, int(settings.poll_interval * 1000))
        greeted = False
        last_beat = 0.0
        deadline: float | None = None
        while True:
            if sock.poll(poll_ms, zmq.POLLIN):
                self._read_acks(sock)
            now = time.monotonic()
            if not greeted or now - last_beat >= settings.heartbeat_interval:
                if self._send_control(sock, HEARTBEAT if greeted else HELLO):
                    greeted = True
                    last_beat = now
            self.outbox.requeue(stale_after=settings.ack_timeout)
            self._send_batches(sock)
            if self.closing.is_set():
                if deadline is None:
                    deadline = now + self.handler.close_budget
                if self.outbox.pending() == 0 or now >= deadline:
                    return

    def _send_batches(self, sock: zmq.Socket[Any]) -> None:
        settings = self.handler.settings
        while self.outbox.has_unsent():
            batch = self.outbox.take(settings.batch_records, settings.batch_bytes)
            try:
                sock.send_multipart([data for _, data in batch], zmq.NOBLOCK)
            except zmq.Again:
                self.outbox.unsend(batch)
                return

    def _send_control(self, sock: zmq.Socket[Any], kind: str) -> bool:
        frame = self._encoder.control(
            kind,
            base=self.outbox.base(),
            dropped=self.outbox.dropped,
            converted=self.handler._encoder.converted,
        )
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _read_acks(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            for frame in frames:
                try:
                    ack = msgpack.unpackb(frame, raw=False)
                except Exception:
                    continue
                if (
                    isinstance(ack, dict)
                    and ack.get("kind") == ACK
                    and ack.get("inc") == self._incarnation
                    and type(ack.get("seq")) is int
                ):
                    self.outbox.ack(ack["seq"])

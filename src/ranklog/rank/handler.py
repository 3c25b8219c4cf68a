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

from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import RankIdentity, derived_endpoint, detect_identity, new_incarnation
from ranklog.rank.outbox import Outbox
from ranklog.rank.sender import Sender, SenderSettings, curve_keys
from ranklog.wire import GOODBYE

_live_handlers: weakref.WeakSet[ZMQSocketHandler] = weakref.WeakSet()


def _reset_handlers_in_child() -> None:
    for handler in list(_live_handlers):
        handler._after_fork()


os.register_at_fork(after_in_child=_reset_handlers_in_child)


class ZMQSocketHandler(logging.Handler):
    """Send each record to a ranklog collector over ZeroMQ; never block, never raise.

    >>> handler = ZMQSocketHandler("tcp://127.0.0.1:5555")          # doctest: +SKIP
    >>> logging.getLogger("instructlab.training.metrics").addHandler(handler)  # doctest: +SKIP

    ``endpoint`` defaults to ``RANKLOG_ENDPOINT``, else the address every rank of the job
    derives alike (see :func:`ranklog.endpoints.derived_endpoint`). Rank fields default to
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
        curve_server_key: str | bytes | None = None,
        curve_key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(level)
        self.identity: RankIdentity = detect_identity(
            rank=rank, local_rank=local_rank, world_size=world_size, run_id=run_id
        )
        self.endpoint = endpoint or derived_endpoint(self.identity)
        self.close_timeout = close_timeout
        self.settings = settings or SenderSettings()
        self._bounds = (max_records, max_bytes)
        self.curve = curve_keys(curve_server_key, curve_key_file)
        self._start_lock = threading.Lock()
        self._fresh_state()
        _live_handlers.add(self)

    def _fresh_state(self) -> None:
        self.outbox = Outbox(*self._bounds)
        self._encoder = RecordEncoder(self.identity)
        self._seq = itertools.count(1)
        self._sender: Sender | None = None
        self._closed = False
        # Once a flush has waited in vain, close() only tries to say goodbye.
        self.close_budget = self.close_timeout

    def _after_fork(self) -> None:
        # The child must not touch the parent's context or thread; the parent still sends
        # what it buffered. The child is a new incarnation with its own seq space.
        self.identity = RankIdentity(
            **{**vars(self.identity), "pid": os.getpid(), "incarnation": new_incarnation()}
        )
        if self._sender is not None:
            self._sender.forget_wake_pipe()
        self._start_lock = threading.Lock()
        self._fresh_state()
        self.createLock()

    def _ensure_sender(self) -> Sender:
        with self._start_lock:
            if self._sender is None:
                self._sender = Sender(self)
                self._sender.start()
            return self._sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sender = self._sender
            if sender is None:
                if self._closed:
                    return
                sender = self._ensure_sender()
            seq = next(self._seq)
            self.outbox.put(seq, self._encoder.record(seq, record))
            if sender.asleep:
                sender.wake()
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
            sender.wake()
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

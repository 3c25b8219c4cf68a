"""Delivery of one process's envelopes to a collector, without the logging module.

A :class:`Sender` owns the bounded outbox, the seq counter and a thread with the DEALER
socket: the thread sends batches from the outbox, reads acknowledgements, resends what was
not acknowledged in time, and says hello, heartbeat and goodbye. Whoever packs envelopes
(``ZMQSocketHandler``, or any caller with a :class:`~ranklog.rank.encoder.RecordEncoder`)
takes a seq from :meth:`Sender.next_seq` and hands the packed bytes to :meth:`Sender.put`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from ranklog.errors import ConfigError
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import RankIdentity
from ranklog.rank.outbox import Outbox, Pending
from ranklog.wire import ACK, GOODBYE, HEARTBEAT, HELLO

CurveKeys = tuple[bytes, bytes, bytes]


@dataclass
class SenderSettings:
    """Timing and batching of the sender thread."""

    poll_interval: float = 0.005
    heartbeat_interval: float = 1.0
    ack_timeout: float = 2.0
    batch_records: int = 512
    batch_bytes: int = 1 << 20
    # Records sent but not yet acknowledged. A window keeps a rank that catches up (after a
    # collector restart, say) from burying the collector in more than it can acknowledge
    # within ack_timeout, which would only make it resend, and bounds what the collector
    # buffers per rank.
    max_in_flight: int = 4096


def curve_keys(
    server_key: str | bytes | None, key_file: str | os.PathLike[str] | None
) -> CurveKeys | None:
    """CURVE settings: the collector's public key (Z85, or a ``.key`` file) and this
    client's key pair (a ``.key_secret`` file from ``ranklog keys``; a fresh pair if None)."""
    if server_key is None:
        if key_file is not None:
            raise ConfigError("curve_key_file needs curve_server_key: the collector's public key")
        return None
    import zmq.auth

    if isinstance(server_key, str) and os.path.exists(server_key):
        server_key = zmq.auth.load_certificate(server_key)[0]
    server = server_key.encode() if isinstance(server_key, str) else server_key
    if key_file is None:
        public, secret = zmq.curve_keypair()
    else:
        public, maybe_secret = zmq.auth.load_certificate(os.fspath(key_file))
        if maybe_secret is None:
            raise ConfigError(f"{key_file} holds no secret key; pass the .key_secret file")
        secret = maybe_secret
    return server, public, secret


def _nothing_converted() -> int:
    return 0


class Sender:
    """Sends the envelopes of one process incarnation to the collector at ``endpoint``.

    ``put`` never blocks: at most ``max_records`` records / ``max_bytes`` bytes wait for
    acknowledgement, and beyond that the oldest are dropped and counted. The thread starts
    with :meth:`start` or the first :meth:`put`. ``close()`` says goodbye and waits up to
    ``close_timeout`` seconds for everything to be acknowledged, then warns about what was
    not. ``converted`` reports how many values the caller's encoder had to convert; the
    count travels in heartbeats and the goodbye.

    To send a record: ``seq = sender.next_seq()``, pack the envelope with that seq
    (``RecordEncoder.record(seq, log_record)``), then ``sender.put(seq, packed)``.
    """

    def __init__(
        self,
        identity: RankIdentity,
        endpoint: str,
        *,
        max_records: int = 100_000,
        max_bytes: int = 256 << 20,
        close_timeout: float = 5.0,
        settings: SenderSettings | None = None,
        curve: CurveKeys | None = None,
        converted: Callable[[], int] = _nothing_converted,
    ) -> None:
        self.identity = identity
        self.endpoint = endpoint
        self.close_timeout = close_timeout
        self.settings = settings or SenderSettings()
        self.curve = curve
        self.outbox = Outbox(max_records, max_bytes)
        self.next_seq: Callable[[], int] = itertools.count(1).__next__
        self.running = False  # from start() until close()
        self.closed = False
        # Once a flush has waited in vain, close() only tries to say goodbye.
        self.close_budget = close_timeout
        self._closing = threading.Event()
        self._converted = converted
        # Control envelopes are packed on the thread, with an encoder of its own.
        self._encoder = RecordEncoder(identity)
        self._thread: threading.Thread | None = None
        # With nothing to send and nothing awaiting an ack the thread sleeps until its next
        # heartbeat; ``asleep`` tells put() to wake it through this pipe (or to start it: it
        # is set until then). A thread that polled instead would take the GIL from the
        # training thread hundreds of times a second.
        self.asleep = True
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def put(self, seq: int, data: bytes | Pending) -> None:
        """Hand over a packed envelope numbered ``seq`` (from :meth:`next_seq`)."""
        self.outbox.put(seq, data)
        if self.asleep:
            self.wake()

    def start(self) -> None:
        """Connect and say hello now rather than at the first record."""
        with self._wake_lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None and not self.closed:
            self.asleep = False
            self.running = True
            self._thread = threading.Thread(
                target=self._run, name=f"ranklog-sender-{self.identity.rank}", daemon=True
            )
            self._thread.start()

    def wake(self) -> None:
        """Have the thread look at the outbox now: start it, or end its idle sleep."""
        with self._wake_lock:
            if self._thread is None:
                self._start_locked()
            elif self.asleep and self._wake_w >= 0:
                self.asleep = False
                # A full pipe (OSError) means a wake-up is already on its way.
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"\0")

    @property
    def stats(self) -> dict[str, int]:
        """Counters a user can check: held (not yet acknowledged), dropped, converted."""
        return {
            "held": self.outbox.pending(),
            "dropped": self.outbox.dropped,
            "converted": self._converted(),
        }

    def flush(self) -> None:
        """Wait (up to ``close_timeout``) until everything put is acknowledged."""
        thread = self._thread
        deadline = time.monotonic() + self.close_timeout
        while thread is not None and thread.is_alive() and self.outbox.pending():
            if time.monotonic() > deadline:
                self.close_budget = min(self.close_timeout, 0.5)
                return
            time.sleep(0.005)

    def close(self) -> None:
        """Say goodbye, wait while it and everything before it may still be acknowledged,
        stop the thread, and warn about anything not delivered."""
        thread = self._thread
        closed, self.closed, self.running = self.closed, True, False
        if closed or thread is None:
            return
        seq = self.next_seq()
        # Packed here, not with the thread's encoder: a Packer is not thread-safe.
        goodbye = RecordEncoder(self.identity).control(
            GOODBYE,
            seq=seq,
            base=self.outbox.base(),
            dropped=self.outbox.dropped,
            converted=self._converted(),
        )
        self.outbox.put(seq, goodbye)
        self._closing.set()
        self.wake()
        thread.join(self.close_budget + 2.0)
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

    def for_child(self, identity: RankIdentity) -> Sender:
        """A fresh sender, set up like this one, for a forked child with ``identity``.

        The child must not touch the parent's context or thread (the parent still sends what
        it buffered); it starts empty, with its own seq space.
        """
        self.forget_wake_pipe()
        return Sender(
            identity,
            self.endpoint,
            max_records=self.outbox.max_records,
            max_bytes=self.outbox.max_bytes,
            close_timeout=self.close_timeout,
            settings=self.settings,
            curve=self.curve,
            converted=self._converted,
        )

    def forget_wake_pipe(self) -> None:
        """Close the wake-up pipe (also in a forked child, where the thread does not exist)."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def _run(self) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # Queue only on live connections: while no collector answers, records wait in the
            # outbox, where they are bounded, counted and resent.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            if self.curve is not None:
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
            # Connection events: whatever was in flight on a connection that dropped is resent
            # first, before newer records, so each rank's records arrive in order.
            monitor = sock.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
            )
            sock.connect(self.endpoint)
            try:
                self._loop(sock, monitor)
            finally:
                sock.disable_monitor()
                monitor.close(linger=0)
        finally:
            sock.close(linger=0)
            context.term()
            with self._wake_lock:
                self.asleep = False
                self.forget_wake_pipe()

    def _loop(self, sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
        settings = self.settings
        poll_ms = max(1, int(settings.poll_interval * 1000))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        beat = settings.heartbeat_interval
        wait_ms = poll_ms
        greeted = False
        last_beat = spoke = 0.0  # spoke: when the collector last heard from this rank
        told = (0, 0)  # the counters the last heartbeat carried
        deadline: float | None = None
        while True:
            ready = dict(poller.poll(wait_ms))
            self.asleep = False
            if monitor in ready:
                self._on_connection_events(monitor)
            if sock in ready:
                self._read_acks(sock)
            if self._wake_r in ready:
                self._drain_wake_pipe()
            now = time.monotonic()
            # Records say "alive" as well as a heartbeat does: a heartbeat goes out after a
            # second of silence, or a second after the last one if its counters changed.
            counters = (self.outbox.dropped, self._converted())
            changed = counters != told and now - last_beat >= beat
            due = not greeted or now - spoke >= beat or changed
            if due and self._send_control(sock, HEARTBEAT if greeted else HELLO):
                greeted = True
                last_beat = spoke = now
                told = counters
            self.outbox.requeue(stale_after=settings.ack_timeout)
            if self._send_batches(sock):
                spoke = now
            if self._closing.is_set():
                if deadline is None:
                    deadline = now + self.close_budget
                if self.outbox.pending() == 0 or now >= deadline:
                    return
            wait_ms = poll_ms
            if greeted and not self.outbox.in_flight():
                # Say so first, then look: a record put after the look finds asleep set.
                self.asleep = True
                if self.outbox.has_unsent() or self._closing.is_set():
                    self.asleep = False
                else:
                    next_beat = spoke + beat - time.monotonic()
                    wait_ms = max(poll_ms, int(next_beat * 1000) + 1)

    def _on_connection_events(self, monitor: zmq.Socket[Any]) -> None:
        while monitor.poll(0):
            recv_monitor_message(monitor)
            self.outbox.requeue()

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass  # empty (BlockingIOError)

    def _send_batches(self, sock: zmq.Socket[Any]) -> bool:
        """Send what the outbox holds, within the in-flight window; True if anything went."""
        settings = self.settings
        send = sock.send
        more = zmq.NOBLOCK | zmq.SNDMORE
        sent = False
        while self.outbox.has_unsent():
            room = settings.max_in_flight - self.outbox.in_flight()
            if room <= 0:
                break
            batch = self.outbox.take(min(room, settings.batch_records), settings.batch_bytes)
            if not batch:
                break  # the next record waits for its CUDA values to reach the host
            # One multipart message per batch. A loop over send() holds the GIL about half as
            # long as send_multipart(), which first type-checks every part in Python.
            last = len(batch) - 1
            try:
                for index in range(last):
                    send(batch[index][1], more)
                send(batch[last][1], zmq.NOBLOCK)
            except zmq.Again:
                self.outbox.unsend(batch)
                break
            sent = True
        return sent

    def _send_control(self, sock: zmq.Socket[Any], kind: str) -> bool:
        frame = self._encoder.control(
            kind,
            base=self.outbox.base(),
            dropped=self.outbox.dropped,
            converted=self._converted(),
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
                    and ack.get("inc") == self.identity.incarnation
                    and type(ack.get("seq")) is int
                ):
                    self.outbox.ack(ack["seq"])

"""The rank's sender thread: owns the DEALER socket, sends batches from the outbox, reads
acknowledgements, resends what was not acknowledged in time, and says hello, heartbeat and
goodbye."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from ranklog.rank.encoder import RecordEncoder
from ranklog.wire import ACK, HEARTBEAT, HELLO

if TYPE_CHECKING:
    from ranklog.rank.handler import ZMQSocketHandler


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
) -> tuple[bytes, bytes, bytes] | None:
    """CURVE settings: the collector's public key (Z85, or a ``.key`` file) and this
    client's key pair (a ``.key_secret`` file from ``ranklog keys``; a fresh pair if None)."""
    if server_key is None:
        if key_file is not None:
            raise ValueError("curve_key_file needs curve_server_key: the collector's public key")
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
            raise ValueError(f"{key_file} holds no secret key; pass the .key_secret file")
        secret = maybe_secret
    return server, public, secret


class Sender(threading.Thread):
    """Owns the DEALER socket of one handler incarnation."""

    def __init__(self, handler: ZMQSocketHandler) -> None:
        super().__init__(name=f"ranklog-sender-{handler.identity.rank}", daemon=True)
        self.handler = handler
        self.outbox = handler.outbox
        self.closing = threading.Event()
        # Control envelopes are packed here, on this thread, with an encoder of its own.
        self._encoder = RecordEncoder(handler.identity)
        self._incarnation = handler.identity.incarnation
        # With nothing to send and nothing awaiting an ack the sender sleeps until its next
        # heartbeat; ``asleep`` tells emit() to wake it through this pipe. A sender that polled
        # instead would take the GIL from the training thread hundreds of times a second.
        self.asleep = False
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def run(self) -> None:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # Queue only on live connections: while no collector answers, records wait in the
            # outbox, where they are bounded, counted and resent.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            if self.handler.curve is not None:
                server, public, secret = self.handler.curve
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
                    server,
                    public,
                    secret,
                )
            # Connection events: whatever was in flight on a connection that dropped is resent
            # first, before newer records, so each rank's records arrive in order.
            monitor = sock.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
            )
            sock.connect(self.handler.endpoint)
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

    def wake(self) -> None:
        """Wake the sender from an idle sleep (the caller just put something in the outbox)."""
        with self._wake_lock:
            if self.asleep and self._wake_w >= 0:
                self.asleep = False
                # A full pipe (OSError) means a wake-up is already on its way.
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"\0")

    def forget_wake_pipe(self) -> None:
        """Close the wake-up pipe (also in a forked child, where this thread does not exist)."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def _loop(self, sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
        settings = self.handler.settings
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
            counters = (self.outbox.dropped, self.handler._encoder.converted)
            changed = counters != told and now - last_beat >= beat
            due = not greeted or now - spoke >= beat or changed
            if due and self._send_control(sock, HEARTBEAT if greeted else HELLO):
                greeted = True
                last_beat = spoke = now
                told = counters
            self.outbox.requeue(stale_after=settings.ack_timeout)
            if self._send_batches(sock):
                spoke = now
            if self.closing.is_set():
                if deadline is None:
                    deadline = now + self.handler.close_budget
                if self.outbox.pending() == 0 or now >= deadline:
                    return
            wait_ms = poll_ms
            if greeted and not self.outbox.in_flight():
                # Say so first, then look: a record put after the look finds asleep set.
                self.asleep = True
                if self.outbox.has_unsent() or self.closing.is_set():
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
        settings = self.handler.settings
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

"""Delivery of one process's envelopes to a collector, without the logging module.

A :class:`Sender` owns the bounded outbox, the seq counter and a thread with the DEALER
socket: the thread sends batches from the outbox, reads acknowledgements, resends what the
collector may not have (:mod:`ranklog.rank.resend`), says hello, heartbeat and goodbye, and
samples system metrics if asked to (:mod:`ranklog.rank.system`). Whoever packs envelopes
(``ZMQSocketHandler``, or any caller with a :class:`~ranklog.rank.encoder.RecordEncoder`)
takes a seq from :meth:`Sender.next_seq` and hands the packed bytes to :meth:`Sender.put`.
How a sender ends (drain, spill, goodbye) is :mod:`ranklog.rank.closing`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from ranklog.rank import closing, signals
from ranklog.rank.closing import Ending
from ranklog.rank.curve import CurveKeys, curve_keys
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import RankIdentity
from ranklog.rank.outbox import Outbox, Pending
from ranklog.rank.resend import RefusalNotice, ResendRule, SilenceNotice
from ranklog.rank.settings import Lock, SenderSettings
from ranklog.rank.system import SystemSampler, system_metrics_wanted
from ranklog.rank.system import system_interval as system_interval_or_default
from ranklog.wire import ACK, HEARTBEAT, HELLO

__all__ = ["CurveKeys", "Lock", "Sender", "SenderSettings", "curve_keys"]
# Waiting on a lone record's ack, the thread still looks at resends this often.
_LONE_ACK_WAIT_MS = 100


def _nothing_converted() -> int:
    return 0


class Sender:
    """Sends the envelopes of one process incarnation to the collector at ``endpoint``.

    ``put`` never blocks: at most ``max_records`` records / ``max_bytes`` bytes wait for
    acknowledgement, and beyond that the oldest are dropped and counted. The thread starts
    with :meth:`start` or the first :meth:`put`. ``converted`` reports how many values the
    caller's encoder had to convert; the count travels in heartbeats and the goodbye.

    ``close()`` spills what is unacknowledged, waits while acknowledgements progress
    (``close_timeout`` without any, ``close_limit`` in all), says goodbye, and leaves the
    spill file only if something was not delivered (:mod:`ranklog.rank.closing`). A
    warning names the endpoint (and ``collector_log``) while no collector answers. With
    ``system_metrics`` the thread queues the process's memory and CPU use every
    ``system_interval`` seconds as records, under ``record_lock`` (the caller's lock for
    numbering and queueing its own records; :mod:`ranklog.rank.system`). With
    ``handle_signals`` (default ``RANKLOG_HANDLE_SIGNALS``, on) a SIGTERM, SIGHUP or SIGQUIT
    spills first, then does what it would have done (:mod:`ranklog.rank.signals`).

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
        close_limit: float = 300.0,
        settings: SenderSettings | None = None,
        curve: CurveKeys | None = None,
        converted: Callable[[], int] = _nothing_converted,
        spill_dir: str | os.PathLike[str] | None = None,
        collector_log: str | os.PathLike[str] | None = None,
        system_metrics: bool | None = None,
        system_interval: float | None = None,
        record_lock: Lock | None = None,
        handle_signals: bool | None = None,
    ) -> None:
        self.identity = identity
        self.endpoint = endpoint
        self.close_timeout = close_timeout
        self.close_limit = close_limit
        self.settings = settings or SenderSettings()
        self.curve = curve
        self.spill_dir = spill_dir
        self.collector_log = None if collector_log is None else os.fspath(collector_log)
        self.outbox = Outbox(max_records, max_bytes)
        self.next_seq: Callable[[], int] = itertools.count(1).__next__
        self.running = False  # from start() until close()
        self.closed = False
        # Once a flush has waited in vain, close() waits only briefly unless acks resume.
        self.close_budget = close_timeout
        self.ending = Ending()
        self._converted = converted
        # Control envelopes are packed on the thread, with an encoder of its own.
        self._encoder = RecordEncoder(identity)
        self._thread: threading.Thread | None = None
        now = time.monotonic()
        self.resend = ResendRule(self.settings.ack_timeout, self.settings.max_ack_timeout, now)
        # False from a dropped connection until the next one's handshake: nothing is sent
        # in between (see _on_connection_events).
        self._link_up = True
        self.silence = SilenceNotice(
            identity.rank, endpoint, self.settings.silence_warning, self.collector_log
        )
        self.refusal = RefusalNotice(identity.rank, endpoint, self.collector_log)
        self._system_args = (system_metrics, system_interval)
        self.system = (
            SystemSampler(system_interval_or_default(system_interval), identity.local_rank)
            if system_metrics_wanted(system_metrics)
            else None
        )
        self._record_lock = record_lock
        self._last_frame = b""  # the newest record sent (for the system metrics' step)
        self._linger_ms = 0
        # With nothing to send and nothing awaiting an ack the thread sleeps until its next
        # heartbeat; ``asleep`` tells put() to wake it through this pipe (or to start it: it
        # is set until then). A thread that polled instead would take the GIL from the
        # training thread hundreds of times a second.
        self.asleep = True
        # Reentrant: the signal handler (ranklog.rank.signals) may run on the main thread
        # while it holds this lock.
        self._wake_lock = threading.RLock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.handle_signals = signals.signals_wanted(handle_signals)
        if self.handle_signals:
            signals.watch(self)

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
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def stats(self) -> dict[str, int]:
        """Counters a user can check: held (not yet acknowledged), dropped, converted."""
        return {
            "held": self.outbox.pending(),
            "dropped": self.outbox.dropped,
            "converted": self._converted(),
        }

    def flush(self) -> None:
        """Spill what is not acknowledged yet, then wait while acknowledgements make
        progress (as :meth:`close` does) until everything put is acknowledged."""
        closing.flush(self)

    def close(self) -> None:
        """Spill, wait while acknowledgements progress, say goodbye, stop the thread, and
        warn about anything not delivered (and where it was spilled)."""
        closing.close(self)

    def for_child(self, identity: RankIdentity, record_lock: Lock | None = None) -> Sender:
        """A fresh sender, set up like this one, for a forked child with ``identity``.

        The child must not touch the parent's context or thread (the parent still sends what
        it buffered); it starts empty, with its own seq space.
        """
        self.forget_wake_pipe()
        system_metrics, system_interval = self._system_args
        return Sender(
            identity,
            self.endpoint,
            max_records=self.outbox.max_records,
            max_bytes=self.outbox.max_bytes,
            close_timeout=self.close_timeout,
            close_limit=self.close_limit,
            settings=self.settings,
            curve=self.curve,
            converted=self._converted,
            spill_dir=self.spill_dir,
            collector_log=self.collector_log,
            system_metrics=system_metrics,
            system_interval=system_interval,
            record_lock=record_lock,
            handle_signals=self.handle_signals,
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
            # first, before newer records, so each rank's records arrive in order (see
            # ranklog.rank.resend).
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
            # A goodbye sent last gets a moment to leave.
            sock.close(linger=self._linger_ms)
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
        # The same, less the socket: while records are in flight and the window has room,
        # the thread looks at acknowledgements once a poll interval, not as each arrives.
        # Each look takes the GIL from the training thread (which then waits a switch
        # interval or more); the collector acknowledges small batches within about a
        # millisecond, so at training cadence that was once or twice per logging call.
        paced = zmq.Poller()
        paced.register(self._wake_r, zmq.POLLIN)
        paced.register(monitor, zmq.POLLIN)
        beat = settings.heartbeat_interval
        wait_ms = poll_ms
        greeted = False
        last_beat = spoke = 0.0  # spoke: when the collector last heard from this rank
        told = (0, 0, 0)  # the counters the last heartbeat carried
        self.resend.heard_at = self.resend.advanced_at = time.monotonic()
        while True:
            in_flight = self.outbox.in_flight()
            # A lone record is not paced: one wake for its ack, not one per poll interval.
            pace = 1 < in_flight < settings.max_in_flight and not self.ending.closing.is_set()
            ready = dict((paced if pace else poller).poll(wait_ms))
            self.asleep = False
            if monitor in ready:
                self._on_connection_events(monitor)
            if pace or sock in ready:
                self._read_acks(sock)
            if self._wake_r in ready:
                self._drain_wake_pipe()
            now = time.monotonic()
            # Records say "alive" as well as a heartbeat does: a heartbeat goes out after a
            # second of silence, or a second after the last one if its counters changed.
            counters = (self.outbox.dropped, self._converted(), self.outbox.resent)
            changed = counters != told and now - last_beat >= beat
            due = not greeted or now - spoke >= beat or changed
            if due and self._link_up and self._send_control(sock, HEARTBEAT if greeted else HELLO):
                greeted = True
                last_beat = spoke = now
                told = counters
            self._pass_chores(now)
            if self._send_batches(sock):
                spoke = now
            if self.ending.closing.is_set() and closing.step(self, sock):
                return
            wait_ms = poll_ms
            in_flight = self.outbox.in_flight()
            if greeted and in_flight <= 1:
                # Say so first, then look: a record put after the look finds asleep set.
                self.asleep = True
                if self.outbox.has_unsent() or self.ending.closing.is_set():
                    self.asleep = False
                elif in_flight:  # a lone record (training cadence): its ack wakes the thread
                    wait_ms = _LONE_ACK_WAIT_MS
                else:
                    wake_at = spoke + beat
                    if self.system is not None:
                        wake_at = min(wake_at, self.system.next_at)
                    wait_ms = max(poll_ms, int((wake_at - time.monotonic()) * 1000) + 1)

    def _pass_chores(self, now: float) -> None:
        """Once a pass: system metrics when due, resends when due, the silence warning."""
        if self.system is not None and self.system.due(now) and not self.ending.closing.is_set():
            self._sample_system(now)
        outbox = self.outbox
        if outbox.in_flight() and self.resend.due(now, outbox.sent_at, outbox.ack_time):
            outbox.requeue()
        self.silence.check(now, self.resend.heard_at, outbox.pending())

    def _sample_system(self, now: float) -> None:
        system = self.system
        assert system is not None
        lock = self._record_lock
        # The caller numbers and queues its records under this lock; never wait for it
        # (logging.shutdown holds it while it flushes).
        if lock is not None and not lock.acquire(blocking=False):
            return
        try:
            system.note_frame(self._last_frame)
            metrics = system.sample(now)
            seq = self.next_seq()
            self.outbox.put(seq, self._encoder.record(seq, system.record(metrics)))
        finally:
            if lock is not None:
                lock.release()

    def _on_connection_events(self, monitor: zmq.Socket[Any]) -> None:
        # Only a dropped connection loses what was in flight: records cannot go out
        # without one (IMMEDIATE). Nor is the connection's queue gone when its event is
        # read: ZeroMQ drops it a moment later, with whatever was sent into it meanwhile.
        # So from a drop until the next connection's handshake nothing is sent; then what
        # was in flight goes first, on the new connection, before newer records (each
        # rank's records reach the journal in order; W&B needs its steps in order).
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._link_up = False
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and not self._link_up:
                self._link_up = True
                self.resend.reconnected()
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
        while self._link_up and self.outbox.has_unsent():
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
            self._last_frame = batch[last][1]
            sent = True
        return sent

    def control(self, kind: str, **fields: Any) -> bytes:
        """A hello, heartbeat or goodbye with the counters (packed with the thread's
        encoder: call it on the thread only)."""
        counters = {
            "base": self.outbox.base(),
            "dropped": self.outbox.dropped,
            "converted": self._converted(),
            "resent": self.outbox.resent,
        }
        return self._encoder.control(kind, **{**counters, **fields})

    def _send_control(self, sock: zmq.Socket[Any], kind: str) -> bool:
        try:
            sock.send(self.control(kind), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def send_last(self, sock: zmq.Socket[Any], frame: bytes) -> None:
        """Send ``frame`` as the thread's last word, given a moment to leave."""
        self._linger_ms = 1000
        with contextlib.suppress(zmq.ZMQError):
            sock.send(frame, zmq.NOBLOCK)

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
                    advanced = self.outbox.ack(ack["seq"])
                    got = ack.get("got")
                    refused = type(got) is int and got > ack["seq"]
                    self.resend.heard(time.monotonic(), advanced=advanced, refused=refused)
                    self.silence.heard()
                    if refused:
                        self.refusal.refused()
                    elif advanced:
                        self.refusal.kept()

"""The sender's thread and its DEALER socket: what goes over the wire, and when.

A :class:`Link` sends batches from the outbox, reads acknowledgements (:mod:`.acks`),
resends what the collector may not have (:mod:`ranklog.rank.resend`), says hello, heartbeat
and goodbye, and samples system metrics if asked to (:mod:`ranklog.rank.system`). Its
:class:`Sender` owns it, starts it and wakes it; the link never calls the sender: what they
share while a sender ends is an :class:`~.ending.Ending`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ranklog.rank.acks import read_acks
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.ending import Ending, ending_step
from ranklog.rank.identity import RankIdentity
from ranklog.rank.outbox import Outbox
from ranklog.rank.resend import RefusalNotice, ResendRule, SilenceNotice
from ranklog.rank.settings import Lock, SenderConfig
from ranklog.rank.system import SystemSampler, system_metrics_wanted
from ranklog.rank.system import system_interval as system_interval_or_default
from ranklog.wire import HEARTBEAT, HELLO


class Link:
    """The thread that delivers ``outbox`` for ``identity`` as ``config`` says.

    ``next_seq`` numbers the control envelopes it adds (and system metrics records);
    ``converted`` reports how many values the caller's encoder had to convert (the count
    travels in heartbeats and the goodbye); ``record_lock`` is the caller's lock for
    numbering and queueing its own records, taken around a system metrics record.
    """

    def __init__(
        self,
        identity: RankIdentity,
        config: SenderConfig,
        outbox: Outbox,
        next_seq: Callable[[], int],
        ending: Ending,
        converted: Callable[[], int],
        record_lock: Lock | None,
    ) -> None:
        self.identity = identity
        self.config = config
        self.settings = config.settings
        self.outbox = outbox
        self.next_seq = next_seq
        self.ending = ending
        self._converted = converted
        self._record_lock = record_lock
        # Control envelopes are packed on the thread, with an encoder of its own.
        self._encoder = RecordEncoder(identity)
        self.thread: threading.Thread | None = None
        now = time.monotonic()
        self.resend = ResendRule(self.settings.ack_timeout, self.settings.max_ack_timeout, now)
        # False from a dropped connection until the next one's handshake: nothing is sent
        # in between (see _on_connection_events).
        self._link_up = True
        self.silence = SilenceNotice(
            identity.rank, config.endpoint, self.settings.silence_warning, config.collector_log
        )
        self.refusal = RefusalNotice(identity.rank, config.endpoint, config.collector_log)
        self.system = (
            SystemSampler(system_interval_or_default(config.system_interval), identity.local_rank)
            if system_metrics_wanted(config.system_metrics)
            else None
        )
        self._last_frame = b""  # the newest record sent (for the system metrics' step)
        self._linger_ms = 0
        # A lone record is in flight and the thread sleeps without watching for its ack
        # (see _idle_wait): the next pass reads it, whatever wakes the thread. Until then
        # what the outbox holds may be acknowledged already (Sender._watch_acks).
        self.acks_unread = False
        self.watch_acks = False  # a caller waits for acknowledgements: wake for each
        # With nothing to send and nothing awaiting an ack the thread sleeps until its next
        # heartbeat; ``asleep`` tells the caller to wake it through this pipe (or to start
        # it: it is set until then). A thread that polled instead would take the GIL from
        # the training thread hundreds of times a second.
        self.asleep = True
        # Reentrant: the signal handler (ranklog.rank.signals) may run on the main thread
        # while it holds this lock.
        self.wake_lock = threading.RLock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def start(self) -> None:
        """Start the thread (the caller holds :attr:`wake_lock`)."""
        self.asleep = False
        self.thread = threading.Thread(
            target=self._run, name=f"ranklog-sender-{self.identity.rank}", daemon=True
        )
        self.thread.start()

    def wake(self) -> None:
        """End the thread's idle sleep: have it look at the outbox now."""
        with self.wake_lock:
            if self.asleep and self._wake_w >= 0:
                self.asleep = False
                # A full pipe (OSError) means a wake-up is already on its way.
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"\0")

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
            if self.config.curve is not None:
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.config.curve
            # Connection events: whatever was in flight on a connection that dropped is resent
            # first, before newer records, so each rank's records arrive in order (see
            # ranklog.rank.resend).
            monitor = sock.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
            )
            sock.connect(self.config.endpoint)
            try:
                self._loop(sock, monitor)
            finally:
                sock.disable_monitor()
                monitor.close(linger=0)
        finally:
            # A goodbye sent last gets a moment to leave.
            sock.close(linger=self._linger_ms)
            context.term()
            with self.wake_lock:
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
            pace = 1 < in_flight < settings.max_in_flight and not self.ending.closing.is_set()
            pace = pace or self.acks_unread
            ready = dict((paced if pace else poller).poll(wait_ms))
            self.asleep = False
            if monitor in ready:
                self._on_connection_events(monitor)
            if pace or sock in ready:
                read_acks(sock, self.identity.incarnation, self.outbox, self.resend,
                          self.silence, self.refusal)  # fmt: skip
            self.acks_unread = False
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
            if self.ending.closing.is_set() and self._ending_step(sock):
                return
            wait_ms = poll_ms if not greeted else self._idle_wait(poll_ms, spoke + beat)

    def _ending_step(self, sock: zmq.Socket[Any]) -> bool:
        """While the sender closes: its goodbye (see ending.py); True when the thread stops."""
        stop, last = ending_step(self.ending, self.outbox, self.next_seq, self.control)
        if last is not None:
            self._send_last(sock, last)
        return stop

    def _idle_wait(self, poll_ms: int, beat_at: float) -> int:
        """How long to wait in the next poll, asleep unless there is more to do: one poll
        interval while records are to send or several are in flight; else until the next
        heartbeat or system sample.

        A lone record in flight (training cadence) does not wake the thread for its ack:
        the next record, heartbeat or close does, and reads it then. A wake-up per
        record is the rank's whole cost at that rate (unless :attr:`watch_acks`: a flush
        waits for it). Its resend is due no sooner than ``ack_timeout`` after it went out,
        so the thread wakes by then at the latest."""
        in_flight = self.outbox.in_flight()
        if in_flight > 1:
            return poll_ms
        # Say so first, then look: a record put after the look finds asleep set.
        self.asleep = True
        if self.outbox.has_unsent() or self.ending.closing.is_set():
            self.asleep = False
            return poll_ms
        wake_at = beat_at if self.system is None else min(beat_at, self.system.next_at)
        if in_flight:
            self.acks_unread = not self.watch_acks
            wake_at = min(wake_at, self.outbox.sent_at + self.settings.ack_timeout)
        return max(poll_ms, int((wake_at - time.monotonic()) * 1000) + 1)

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
        with contextlib.suppress(OSError):  # empty (BlockingIOError)
            while os.read(self._wake_r, 4096):
                pass

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
        encoder: on the thread only)."""
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

    def _send_last(self, sock: zmq.Socket[Any], frame: bytes) -> None:
        """Send ``frame`` as the thread's last word, given a moment to leave."""
        self._linger_ms = 1000
        with contextlib.suppress(zmq.ZMQError):
            sock.send(frame, zmq.NOBLOCK)

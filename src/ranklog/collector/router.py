"""The collector's one ROUTER socket, with ZeroMQ's CURVE authenticator when configured."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from ranklog.collector.events import Event, event
from ranklog.collector.gaps import Gaps
from ranklog.collector.receive import Message
from ranklog.collector.settings import ServeSettings
from ranklog.errors import ConfigError
from ranklog.wire import MAX_FRAME_BYTES

_log = logging.getLogger(__name__)
# Frames received (and their records journaled and fsynced) together. Each pass holds its
# decoded envelopes (about 2.5 KB a record) until the fsync: 1,024 stay in the CPU's caches,
# 4,096 did not (the receive loop's CPU per record was a quarter higher).
_BATCH_FRAMES = 1024
REFUSAL_REPORT_EVERY = 60.0  # seconds between lines about one refused client key
_REFUSED_KEYS_KEPT = 4096  # keys whose last report is remembered (more: forgotten at once)
# A batch under this many frames waits up to _GATHER_S for the rest of its step's records.
_GATHER_BELOW = 64
_GATHER_S = 0.005
# Gathers that caught nothing in a row (ranks out of step) after which small batches stop
# waiting; one in _GATHER_RETRY still waits, to notice when the ranks fall in step again.
_GATHER_MISSES = 3
_GATHER_RETRY = 16
# Out of step, a small batch is held instead, the thread asleep, so that one commit serves
# the records that arrive meanwhile: at most _HOLD_S, and at most half the shortest recent
# gap between two messages of one rank (ranklog.collector.gaps). That rank's next record
# then still finds its last one acknowledged, and the rank sleeps through: with two in
# flight it would look for their acks every few milliseconds.
_HOLD_S = 0.25


class Router:
    """Binds ``settings.bind`` on enter (``endpoint`` is what it bound), closes on exit."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.endpoint = ""
        self._misses = 0  # gathers in a row that caught nothing
        self._gaps = Gaps()

    def __enter__(self) -> Router:
        self._context = zmq.Context()
        self._authenticator: Any = None
        self._allow_list: AllowList | None = None
        try:
            if self.settings.curve_secret is not None:
                self._authenticator, self._allow_list = _start_curve(
                    self._context, self.settings.curve_allow
                )
            self._sock = self._open_socket()
            self._poll_items = [(self._sock, zmq.POLLIN)]
        except BaseException:
            self._close_context()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A moment of linger so the last acknowledgements (of goodbyes) reach the ranks.
        self._sock.close(linger=500)
        self._close_context()
        if self.endpoint.startswith("ipc://"):
            # ZeroMQ leaves the socket file behind; nothing listens on it any more.
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint.removeprefix("ipc://"))

    def refusals(self) -> list[Event]:
        """``client_refused`` events since the last call (one per key a minute at most)."""
        return self._allow_list.take_events() if self._allow_list is not None else []

    def _close_context(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()

    def _open_socket(self) -> zmq.Socket[Any]:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.settings.curve_secret is not None:
                public, secret = _load_key_pair(self.settings.curve_secret)
                sock.curve_server = True
                sock.curve_publickey, sock.curve_secretkey = public, secret
            # Frames up to 4x the decode limit arrive and are rejected with a reason; beyond
            # that ZeroMQ drops the peer's connection before anything is buffered.
            sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_FRAME_BYTES)
            # A few messages per rank in flight: when the collector falls behind, records
            # wait in the ranks' bounded outboxes rather than pile up here.
            sock.setsockopt(zmq.RCVHWM, 16)
            try:
                sock.bind(self.settings.bind)
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot listen on {self.settings.bind}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def receive(self, timeout_ms: int) -> list[Message]:
        """Wait up to ``timeout_ms`` for messages; take what has arrived, a bounded batch
        (so memory stays flat and stop requests and status lines still run).

        A small batch waits up to :data:`_GATHER_S` for more: the ranks of a job log in
        step, so the others' records of the same step arrive within a few milliseconds,
        and one commit (one fsync, one ack pass, one read by the backends) serves them
        all instead of one each. Under load batches are full and nothing waits. Ranks out
        of step gain nothing by it, only a second wake-up per record: after
        :data:`_GATHER_MISSES` gathers in a row caught nothing, a small batch is held
        instead (:meth:`_hold`), and only one batch in :data:`_GATHER_RETRY` gathers."""
        messages: list[Message] = []
        # zmq_poll on a list kept for it: Socket.poll builds a Poller per call, a good part
        # of a pass's own CPU when records arrive one by one.
        if not zmq.zmq_poll(self._poll_items, timeout_ms):
            return messages
        frames = self._take(messages, 0)
        if frames >= _GATHER_BELOW:
            return messages
        self._note_gaps(messages, 0)
        if not self._gather_now():
            self._hold(messages, frames)
            return messages
        taken, first = frames, len(messages)
        deadline = time.monotonic() + _GATHER_S
        while frames < _GATHER_BELOW and (left := deadline - time.monotonic()) > 0:
            if not zmq.zmq_poll(self._poll_items, max(1, int(left * 1000))):
                break
            frames = self._take(messages, frames)
        self._misses = 0 if frames > taken else self._misses + 1
        self._note_gaps(messages, first)
        return messages

    def _hold(self, messages: list[Message], frames: int) -> None:
        """Ranks out of step: sleep while it pays (see :data:`_HOLD_S`), then take what
        came meanwhile."""
        shortest = self._gaps.shortest
        if shortest is None or (hold := min(_HOLD_S, shortest / 2)) < _GATHER_S:
            return
        time.sleep(hold)
        before = len(messages)
        self._take(messages, frames)
        self._note_gaps(messages, before)

    def _note_gaps(self, messages: list[Message], start: int) -> None:
        self._gaps.note([route for route, _ in messages[start:]], time.monotonic())

    def _gather_now(self) -> bool:
        """Whether this small batch waits for more (see :meth:`receive`)."""
        if self._misses < _GATHER_MISSES:
            return True
        self._misses += 1
        return (self._misses - _GATHER_MISSES) % _GATHER_RETRY == 0

    def _take(self, messages: list[Message], frames: int) -> int:
        """Add what has arrived to ``messages`` (up to the batch bound); the frames now."""
        # recv_multipart, less its per-part getsockopt(RCVMORE) (a third of its time): a
        # part says itself whether more follow.
        recv, no_block = self._sock.recv, zmq.NOBLOCK
        while frames < _BATCH_FRAMES:
            try:
                part = recv(no_block, copy=False)
            except zmq.Again:
                break
            route, payload = part.bytes, []
            while part.more:
                part = recv(no_block, copy=False)
                payload.append(part.bytes)
            messages.append((route, payload))
            frames += len(payload)
        return frames

    def send(self, replies: list[tuple[bytes, bytes]]) -> None:
        """Send ``(route, frame)`` replies; one that cannot go out now is dropped (a rank
        resends after its ack timeout)."""
        # Two sends, not send_multipart (which type-checks each part in Python first).
        send, more, no_block = self._sock.send, zmq.NOBLOCK | zmq.SNDMORE, zmq.NOBLOCK
        for route, frame in replies:
            try:
                send(route, more)
                send(frame, no_block)
            except zmq.ZMQError:
                continue


def _load_key_pair(path: Path) -> tuple[bytes, bytes]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE key {path}: {exc}") from None
    if secret is None:
        raise ConfigError(f"{path} holds no secret key; pass the .key_secret file")
    return public, secret


def _start_curve(context: zmq.Context[Any], allow: Path | None) -> tuple[Any, AllowList | None]:
    """ZeroMQ's authenticator: only allowed client keys connect (any, without ``allow``)."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    if allow is None:
        authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        _log.warning("CURVE without --curve-allow: encrypted, but any client key may connect")
        return authenticator, None
    if not any(allow.glob("*.key")):
        authenticator.stop()
        raise ConfigError(f"no public keys (*.key) in {allow}")
    allow_list = AllowList(allow)
    authenticator.configure_curve_callback(domain="*", credentials_provider=allow_list)
    return authenticator, allow_list


class AllowList:
    """The client keys ``--curve-allow`` names, as pyzmq's authenticator asks about them
    (``callback``, on its thread). A refused key is logged at most once a minute (with how
    often it was refused since), so an attacker cannot flood the log."""

    def __init__(self, folder: Path, clock: Callable[[], float] = time.monotonic) -> None:
        import zmq.auth

        self.folder = folder
        self._clock = clock
        self._allowed = set(zmq.auth.load_certificates(str(folder)))
        self._lock = threading.Lock()
        self._reported: dict[bytes, tuple[float, int]] = {}  # key: (last report, refusals since)
        self._events: list[Event] = []

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self._allowed:
            return True
        now = self._clock()
        with self._lock:
            if len(self._reported) >= _REFUSED_KEYS_KEPT:
                self._reported.clear()
            reported_at, since = self._reported.get(key, (-REFUSAL_REPORT_EVERY, 0))
            if now - reported_at < REFUSAL_REPORT_EVERY:
                self._reported[key] = (reported_at, since + 1)
                return False
            self._reported[key] = (now, 0)
            self._events.append(event("client_refused", key=key.decode(), refused_since=since))
        _log.warning(
            "refused a client: its CURVE key %s is not in --curve-allow %s%s (further "
            "refusals of this key are logged once a minute)",
            key.decode(),
            self.folder,
            f"; refused {since} more times since the last line" if since else "",
        )
        return False

    def take_events(self) -> list[Event]:
        with self._lock:
            events, self._events = self._events, []
        return events

"""The collector's one ROUTER socket, with ZeroMQ's CURVE authenticator when configured."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import zmq

from ranklog.collector.receive import Message
from ranklog.collector.settings import ServeSettings
from ranklog.errors import ConfigError
from ranklog.wire import MAX_FRAME_BYTES

_log = logging.getLogger(__name__)
# Frames received (and their records journaled and fsynced) together. Each pass holds its
# decoded envelopes (about 2.5 KB a record) until the fsync: 1,024 stay in the CPU's caches,
# 4,096 did not (the receive loop's CPU per record was a quarter higher).
_BATCH_FRAMES = 1024
# A batch under this many frames waits up to _GATHER_S for the rest of its step's records.
_GATHER_BELOW = 64
_GATHER_S = 0.005


class Router:
    """Binds ``settings.bind`` on enter (``endpoint`` is what it bound), closes on exit."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.endpoint = ""

    def __enter__(self) -> Router:
        self._context = zmq.Context()
        self._authenticator: Any = None
        try:
            if self.settings.curve_secret is not None:
                self._authenticator = _start_curve(self._context, self.settings.curve_allow)
            self._sock = self._open_socket()
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
        all instead of one each. Under load batches are full and nothing waits."""
        messages: list[Message] = []
        if not self._sock.poll(timeout_ms, zmq.POLLIN):
            return messages
        frames = self._take(messages, 0)
        deadline = time.monotonic() + _GATHER_S
        while frames < _GATHER_BELOW and (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                break
            frames = self._take(messages, frames)
        return messages

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
        for route, frame in replies:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart([route, frame], zmq.NOBLOCK)


def _load_key_pair(path: Path) -> tuple[bytes, bytes]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE key {path}: {exc}") from None
    if secret is None:
        raise ConfigError(f"{path} holds no secret key; pass the .key_secret file")
    return public, secret


def _start_curve(context: zmq.Context[Any], allow: Path | None) -> Any:
    """ZeroMQ's authenticator: only allowed client keys connect (any, without ``allow``)."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    if allow is None:
        authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        _log.warning("CURVE without --curve-allow: encrypted, but any client key may connect")
    elif not any(allow.glob("*.key")):
        authenticator.stop()
        raise ConfigError(f"no public keys (*.key) in {allow}")
    else:
        authenticator.configure_curve(domain="*", location=str(allow))
    return authenticator

"""The collector: one ROUTER socket for every rank, de-duplication, and the backends' fan-out."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from ranklog._backends import (
    install_backends,
    load_config_file,
    metric_logging_config,
    parse_logger_types,
)
from ranklog._codec import (
    GOODBYE,
    MAX_FRAME_BYTES,
    RECORD,
    decode,
    pack_ack,
)
from ranklog._dedupe import SeqTracker
from ranklog._endpoint import is_local_only
from ranklog._errors import ConfigError, ProtocolError
from ranklog._fanout import QueuedHandler

_log = logging.getLogger("ranklog.collector")
DEFAULT_BIND = "tcp://127.0.0.1:5555"


@dataclass
class _Peer:
    """One rank incarnation as the collector sees it."""

    rank: int
    world_size: int
    host: str
    pid: int
    tracker: SeqTracker = field(default_factory=SeqTracker)
    last_seen: float = 0.0
    goodbye_seq: int | None = None
    dropped: int = 0
    converted: int = 0

    @property
    def finished(self) -> bool:
        return self.goodbye_seq is not None and self.tracker.contiguous >= self.goodbye_seq


@dataclass
class CollectorStats:
    """Counters the collector reports in its status line and on exit."""

    accepted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class Collector:
    """Receive every rank's records and run the logging backends on them.

    >>> with Collector("tcp://127.0.0.1:5555", output_dir="logs") as collector:  # doctest: +SKIP
    ...     ...  # ranks log; records land in logs/*.jsonl

    ``logger_types`` picks InstructLab's backends (``async``, ...); ``config`` instead names
    a dictConfig YAML/JSON file whose handlers run here. With ``exit_when_done`` the collector
    stops once every one of ``world_size`` ranks said goodbye or stayed silent for
    ``silence_timeout`` seconds. Binding TCP beyond loopback needs ``allow_remote``.
    """

    def __init__(
        self,
        bind: str = DEFAULT_BIND,
        *,
        output_dir: str | Path = "logs",
        logger_types: str | list[str] = "async",
        run_name: str | None = None,
        config: str | Path | None = None,
        world_size: int | None = None,
        exit_when_done: bool = False,
        silence_timeout: float = 60.0,
        drain_timeout: float = 10.0,
        status_interval: float = 30.0,
        allow_remote: bool = False,
    ) -> None:
        if not allow_remote and not is_local_only(bind):
            raise ConfigError(
                f"refusing to listen on {bind}: beyond this machine; pass allow_remote=True "
                "(--allow-remote) to accept ranks from other hosts"
            )
        if exit_when_done and not world_size:
            raise ConfigError("exit_when_done needs world_size: how many ranks to wait for")
        self.bind = bind
        self.output_dir = Path(output_dir)
        self.loggers = parse_logger_types(logger_types)
        self.run_name = run_name
        self.config_path = config
        self.world_size = world_size
        self.exit_when_done = exit_when_done
        self.silence_timeout = silence_timeout
        self.drain_timeout = drain_timeout
        self.status_interval = status_interval
        self.stats = CollectorStats()
        self.endpoint: str | None = None
        self.backends: list[QueuedHandler] = []
        self._peers: dict[tuple[str, int, str], _Peer] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()
        self.exit_code: int | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the receive loop to stop, drain the backends and return (signal-safe)."""
        self._stop.set()

    def start(self) -> Collector:
        """Run the collector on a background thread; return once it listens."""
        self._thread = threading.Thread(target=self.run, name="ranklog-collector", daemon=True)
        self._thread.start()
        while not self._ready.wait(0.05):
            if not self._thread.is_alive():
                raise ConfigError("collector failed to start; see the log above")
        return self

    def stop(self, timeout: float | None = None) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def run(self) -> int:
        """Listen, serve until stopped (or done), drain, and return the exit code."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        config = (
            load_config_file(self.config_path)
            if self.config_path
            else metric_logging_config(self.loggers, self.run_name, self.output_dir)
        )
        self.backends = install_backends(config)
        context = zmq.Context()
        sock = context.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # Frames up to 4x the decode limit arrive and are rejected with a reason; beyond
            # that ZeroMQ drops the peer's connection before anything is buffered.
            sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_FRAME_BYTES)
            try:
                sock.bind(self.bind)
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot listen on {self.bind}: {exc}") from None
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            _log.info(
                "ranklog collector listening on %s (backends: %s, output: %s)",
                self.endpoint,
                ", ".join(str(b.name) for b in self.backends) or "none",
                self.output_dir,
            )
            self._ready.set()
            self._serve(sock)
        finally:
            # A moment of linger so the last acknowledgements (of goodbyes) reach the ranks.
            sock.close(linger=500)
            context.term()
            self._ready.set()
        self.exit_code = 0 if self._drain() else 1
        return self.exit_code

    # -- receive loop --------------------------------------------------------------------

    def _serve(self, sock: zmq.Socket[Any]) -> None:
        next_status = time.monotonic() + self.status_interval
        last_accepted = 0
        while not self._stop.is_set():
            if sock.poll(100, zmq.POLLIN):
                for _ in range(1000):  # bounded, so stop requests and status lines still run
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(sock, frames)
            now = time.monotonic()
            if now >= next_status:
                rate = (self.stats.accepted - last_accepted) / self.status_interval
                last_accepted = self.stats.accepted
                next_status = now + self.status_interval
                self._log_status(rate)
            if self.exit_when_done and self._all_done(now):
                _log.info("every rank finished; draining and exiting")
                return

    def _on_message(self, sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        route, payload = frames[0], frames[1:]
        touched: dict[tuple[str, int, str], _Peer] = {}
        now = time.monotonic()
        for frame in payload:
            try:
                envelope = decode(frame)
            except ProtocolError as exc:
                self._reject(exc)
                continue
            key = (envelope["run"], envelope["rank"], envelope["inc"])
            peer = self._peers.get(key)
            if peer is None:
                if envelope["kind"] == "ack":
                    self._reject(ProtocolError("unexpected-kind", "a rank sent an ack"))
                    continue
                peer = self._peers[key] = self._new_peer(envelope)
            peer.last_seen = now
            touched[key] = peer
            self._apply(peer, envelope)
        for (run, rank, inc), peer in touched.items():
            # If the ack cannot go out now, the rank resends after its ack timeout.
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(
                    [route, pack_ack(run, rank, inc, peer.tracker.contiguous)], zmq.NOBLOCK
                )

    def _new_peer(self, envelope: dict[str, Any]) -> _Peer:
        peer = _Peer(
            rank=envelope["rank"],
            world_size=envelope["world_size"],
            host=envelope["host"],
            pid=envelope["pid"],
        )
        _log.info(
            "rank %d joined (host %s, pid %d, world size %d)",
            peer.rank,
            peer.host,
            peer.pid,
            peer.world_size,
        )
        return peer

    def _apply(self, peer: _Peer, envelope: dict[str, Any]) -> None:
        kind = envelope["kind"]
        if kind == RECORD:
            if peer.tracker.accept(envelope["seq"]):
                self.stats.accepted += 1
                self._dispatch(envelope)
            else:
                self.stats.duplicates += 1
            return
        if kind == GOODBYE:
            if not peer.tracker.accept(envelope["seq"]):
                return
            peer.goodbye_seq = envelope["seq"]
        peer.dropped = max(peer.dropped, envelope["dropped"])
        peer.converted = max(peer.converted, envelope["converted"])
        peer.tracker.skip_below(envelope["base"])
        if kind == GOODBYE:
            _log.info(
                "rank %d said goodbye (%d dropped on the rank, %d values sent as repr)",
                peer.rank,
                peer.dropped,
                peer.converted,
            )

    def _dispatch(self, envelope: dict[str, Any]) -> None:
        record = logging.LogRecord(
            envelope["logger"], envelope["level"], "", 0, envelope["msg"], None, None
        )
        record.__dict__.update(envelope["extra"])
        record.created = envelope["time"]
        record.msecs = (record.created - int(record.created)) * 1000
        record.process = envelope["pid"]
        record.step = envelope["step"]
        record.hparams = envelope["hparams"]
        record.rank = envelope["rank"]
        record.local_rank = envelope["local_rank"]
        record.world_size = envelope["world_size"]
        record.host = envelope["host"]
        record.run_id = envelope["run"]
        logging.getLogger(envelope["logger"]).handle(record)

    def _reject(self, error: ProtocolError) -> None:
        self.stats.rejected[error.reason] += 1
        if self.stats.rejected[error.reason] == 1:
            _log.warning("rejected a frame (%s); further ones of this kind are only counted", error)

    # -- liveness and exit ---------------------------------------------------------------

    def _expected_world_size(self) -> int:
        seen = max((peer.world_size for peer in self._peers.values()), default=1)
        return self.world_size or seen

    def _all_done(self, now: float) -> bool:
        for rank in range(self._expected_world_size()):
            peers = [peer for (_, r, _), peer in self._peers.items() if r == rank]
            if any(peer.finished for peer in peers):
                continue
            last_seen = max((peer.last_seen for peer in peers), default=self._started_at)
            if now - last_seen < self.silence_timeout:
                return False
        return True

    def _log_status(self, rate: float) -> None:
        _log.info(
            "%.0f records/s; %d accepted, %d duplicates dropped, %d rank incarnations, "
            "rank-side drops %d, rejected %s",
            rate,
            self.stats.accepted,
            self.stats.duplicates,
            len(self._peers),
            sum(peer.dropped for peer in self._peers.values()),
            dict(self.stats.rejected) or 0,
        )

    def _drain(self) -> bool:
        deadline = time.monotonic() + self.drain_timeout
        clean = all([backend.close_within(deadline) for backend in self.backends])
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger):
                logger.handlers = [h for h in logger.handlers if h not in self.backends]
        self._log_status(0.0)
        _log.info("collector stopped: %d records accepted", self.stats.accepted)
        return clean

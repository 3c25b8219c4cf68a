"""The collector: one ROUTER socket for every rank, de-duplication, and the backends' fan-out."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from ranklog.collector.backend_process import BackendProcess
from ranklog.collector.peers import Peer, PeerKey, RankTable
from ranklog.endpoints import is_local_only
from ranklog.errors import ConfigError, ProtocolError
from ranklog.journal import Journal, journal_path
from ranklog.names import DEFAULT_POLICY_TIMEOUT, parse_logger_types, parse_policy_spec
from ranklog.pipe import BackendSpec
from ranklog.wire import ACK, GOODBYE, MAX_FRAME_BYTES, RECORD, decode, pack_ack

_log = logging.getLogger(__name__)
EVENTS_FILE = "ranklog-events.jsonl"
_QUIET_BEFORE_EXIT = 0.3
MAX_INCARNATIONS = 100_000
_BATCH_RECORDS = 4096  # records journaled (and fsynced) together
DEFAULT_BIND = "tcp://127.0.0.1:5555"


@dataclass
class _Batch:
    """What one pass of the receive loop collected, committed together."""

    accepted: list[tuple[Peer, dict[str, Any], bytes]] = field(default_factory=list)
    seen: set[tuple[PeerKey, int]] = field(default_factory=set)
    acks: dict[tuple[bytes, PeerKey], Peer] = field(default_factory=dict)


def _load_key_pair(path: Path) -> tuple[bytes, bytes]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CURVE key {path}: {exc}") from None
    if secret is None:
        raise ConfigError(f"{path} holds no secret key; pass the .key_secret file")
    return public, secret


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
    ``policy`` (``"tensorboard=mean,wandb=rank0"``) picks each backend's rank policy; a
    reducing one waits ``policy_timeout`` seconds for missing ranks.
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
        drain_timeout: float = 30.0,
        status_interval: float = 30.0,
        allow_remote: bool = False,
        policy: str | Mapping[str, str] | None = None,
        policy_timeout: float = DEFAULT_POLICY_TIMEOUT,
        curve_secret: str | Path | None = None,
        curve_allow: str | Path | None = None,
    ) -> None:
        if not allow_remote and not is_local_only(bind):
            raise ConfigError(
                f"refusing to listen on {bind}: beyond this machine; pass allow_remote=True "
                "(--allow-remote) to accept ranks from other hosts"
            )
        if curve_allow is not None and curve_secret is None:
            raise ConfigError("curve_allow needs curve_secret: the collector's own key pair")
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
        self.policies = parse_policy_spec(policy)  # per backend: rank0, first, all, mean, ...
        self.policy_timeout = policy_timeout
        self.curve_secret = Path(curve_secret) if curve_secret else None
        self.curve_allow = Path(curve_allow) if curve_allow else None
        self.stats = CollectorStats()
        self.endpoint: str | None = None
        self.backends: list[str] = []  # their names
        self._backends: BackendProcess | None = None
        self.ranks = RankTable()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = time.monotonic()
        self.exit_code: int | None = None
        self._journal_error: str | None = None
        self._journal_retry_at = 0.0
        self._last_message_at = 0.0
        self._absent_reported = False

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

    def _open_backends(self, *, from_start: bool = False) -> None:
        """Journal first, then the backends' process: each backend resumes from its
        checkpoint and reads the journal on to its durable end."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(journal_path(self.output_dir))
        self._recover()
        # A bad config file or policy fails here, in the child, before anything listens.
        self._backends = BackendProcess(
            BackendSpec(
                output_dir=str(self.output_dir),
                loggers=self.loggers,
                run_name=self.run_name,
                config=str(self.config_path) if self.config_path else None,
                policies=self.policies,
                world_size=self.world_size,
                policy_timeout=self.policy_timeout,
                drain_timeout=self.drain_timeout,
                from_start=from_start,
                log_level=_log.getEffectiveLevel(),
            )
        )
        self.backends = self._backends.names

    def replay(self, *, from_start: bool = False) -> int:
        """Bring the backends up to date from the journal without listening (``ranklog
        replay``): backfill a backend added later, or one that failed. ``from_start``
        rebuilds them from the journal's first entry."""
        self._open_backends(from_start=from_start)
        self.exit_code = 0 if self._drain() else 1
        self.journal.close()
        return self.exit_code

    def run(self) -> int:
        """Listen, serve until stopped (or done), drain, and return the exit code."""
        self._open_backends()
        try:
            self._listen_and_serve()
        finally:
            # Also when listening failed: the backends' process must not outlive the loop.
            self.exit_code = 0 if self._drain() else 1
            self.journal.close()
        return self.exit_code

    def _listen_and_serve(self) -> None:
        context = zmq.Context()
        authenticator = self._start_curve(context)
        sock = context.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve_secret is not None:
                public, secret = _load_key_pair(self.curve_secret)
                sock.curve_server = True
                sock.curve_publickey, sock.curve_secretkey = public, secret
            # Frames up to 4x the decode limit arrive and are rejected with a reason; beyond
            # that ZeroMQ drops the peer's connection before anything is buffered.
            sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_FRAME_BYTES)
            # A few messages per rank in flight: when the collector falls behind, records wait
            # in the ranks' bounded outboxes rather than pile up here.
            sock.setsockopt(zmq.RCVHWM, 16)
            try:
                sock.bind(self.bind)
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot listen on {self.bind}: {exc}") from None
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            _log.info(
                "ranklog collector listening on %s (backends: %s, output: %s)",
                self.endpoint,
                ", ".join(self.backends) or "none",
                self.output_dir,
            )
            self._ready.set()
            self._serve(sock)
        finally:
            # A moment of linger so the last acknowledgements (of goodbyes) reach the ranks.
            sock.close(linger=500)
            if authenticator is not None:
                authenticator.stop()
            context.term()
            self._ready.set()

    def _start_curve(self, context: zmq.Context[Any]) -> Any:
        """With CURVE keys, start ZeroMQ's authenticator: only allowed client keys connect."""
        if self.curve_secret is None:
            return None
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        authenticator = ThreadAuthenticator(context)
        authenticator.start()
        if self.curve_allow is None:
            authenticator.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
            _log.warning("CURVE without --curve-allow: encrypted, but any client key may connect")
        else:
            if not any(self.curve_allow.glob("*.key")):
                authenticator.stop()
                raise ConfigError(f"no public keys (*.key) in {self.curve_allow}")
            authenticator.configure_curve(domain="*", location=str(self.curve_allow))
        return authenticator

    # -- receive loop --------------------------------------------------------------------

    def _serve(self, sock: zmq.Socket[Any]) -> None:
        next_status = time.monotonic() + self.status_interval
        last_accepted = self.stats.accepted
        done_at: float | None = None
        while not self._stop.is_set():
            if sock.poll(100, zmq.POLLIN):
                batch = _Batch()
                # Bounded, so memory stays flat and stop requests and status lines still run.
                while len(batch.accepted) < _BATCH_RECORDS:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._receive(frames, batch)
                self._commit(sock, batch)
            # Once per pass, after the commit: the backends read on to what is durable (an
            # end the pipe could not take then goes out on a later pass).
            assert self._backends is not None
            self._backends.advance(self.journal.durable_end)
            now = time.monotonic()
            self._check_liveness(now)
            if now >= next_status:
                rate = (self.stats.accepted - last_accepted) / self.status_interval
                last_accepted = self.stats.accepted
                next_status = now + self.status_interval
                self._log_status(rate)
            if self.exit_when_done and self._all_done(now):
                # Stay until the ranks are quiet, so a rank whose last ack went missing can
                # resend once and hear back, rather than wait out its close timeout.
                quiet_since = max(self._last_message_at, done_at := done_at or now)
                if now - quiet_since >= _QUIET_BEFORE_EXIT or now - done_at >= 3.0:
                    _log.info("every rank finished; draining and exiting")
                    return

    def _receive(self, frames: list[bytes], batch: _Batch) -> None:
        route, payload = frames[0], frames[1:]
        now = self._last_message_at = time.monotonic()
        for frame in payload:
            try:
                self._receive_frame(route, frame, batch, now)
            except ProtocolError as exc:
                self._reject(exc)
            except Exception as exc:  # a bug must cost one frame, never the collector
                self._reject(ProtocolError("internal-error", f"{type(exc).__name__}: {exc}"))
                if self.stats.rejected["internal-error"] == 1:
                    _log.exception("error while handling a frame; it was dropped")

    def _receive_frame(self, route: bytes, frame: bytes, batch: _Batch, now: float) -> None:
        envelope = decode(frame)
        kind = envelope["kind"]
        if kind == ACK:
            raise ProtocolError("unexpected-kind", "a rank sent an ack")
        key = (envelope["run"], envelope["rank"], envelope["inc"])
        peer = self.ranks.get(key)
        if peer is None:
            if len(self.ranks) >= MAX_INCARNATIONS:
                raise ProtocolError("too-many-ranks", f"over {MAX_INCARNATIONS} incarnations")
            peer = self.ranks.add(key, self._new_peer(envelope))
        if peer.silent:
            peer.silent = False
            self._event("rank_resumed", rank=peer.rank, pid=peer.pid)
        peer.last_seen = now
        batch.acks[(route, key)] = peer
        if kind in (RECORD, GOODBYE):
            seq = envelope["seq"]
            if peer.tracker.seen(seq) or (key, seq) in batch.seen:
                self.stats.duplicates += 1
                return
            batch.seen.add((key, seq))
            batch.accepted.append((peer, envelope, frame))
        else:
            self._note_counters(peer, envelope)

    def _commit(self, sock: zmq.Socket[Any], batch: _Batch) -> None:
        """Journal and fsync the batch, then apply it, then acknowledge: nothing is acked
        before it is durable, and nothing reaches a backend before it is acked."""
        if batch.accepted and time.monotonic() < self._journal_retry_at:
            batch.accepted.clear()  # the disk was just full: let the ranks resend in a moment
        if batch.accepted:
            try:
                for _, _, frame in batch.accepted:
                    self.journal.append(frame)
                self.journal.sync()
            except OSError as exc:
                self._journal_failed(exc)
                batch.accepted.clear()  # not acknowledged: the ranks keep them and resend
            else:
                if self._journal_error is not None:
                    _log.warning("journal writable again; acknowledging and delivering resumes")
                    self._event("journal_resumed", after=self._journal_error)
                    self._journal_error = None
                for peer, envelope, _ in batch.accepted:
                    try:
                        self._apply(peer, envelope)
                    except Exception:  # one bad record must never stop the others
                        self.stats.rejected["internal-error"] += 1
                        _log.exception("error while applying a record; it was skipped")
        for (route, (run, rank, inc)), peer in batch.acks.items():
            # If the ack cannot go out now, the rank resends after its ack timeout.
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(
                    [route, pack_ack(run, rank, inc, peer.tracker.contiguous)], zmq.NOBLOCK
                )

    def _journal_failed(self, exc: OSError) -> None:
        reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        self._journal_retry_at = time.monotonic() + 0.5
        if self._journal_error is None:
            _log.error(
                "cannot write the journal %s (%s); not acknowledging anything until it can: "
                "the ranks hold their records and resend them. Free some space.",
                self.journal.path,
                reason,
            )
            self._event("journal_blocked", error=reason)
        self._journal_error = reason

    def _new_peer(self, envelope: dict[str, Any], quiet: bool = False) -> Peer:
        peer = Peer(
            rank=envelope["rank"],
            world_size=envelope["world_size"],
            host=envelope["host"],
            pid=envelope["pid"],
        )
        if not quiet:
            # Past a few thousand incarnations this is noise (or an attack): keep it quiet.
            _log.log(
                logging.INFO if len(self.ranks) < 4096 else logging.DEBUG,
                "rank %d joined (host %s, pid %d, world size %d)",
                peer.rank,
                peer.host,
                peer.pid,
                peer.world_size,
            )
            self._event("rank_joined", rank=peer.rank, host=peer.host, pid=peer.pid)
        return peer

    def _note_counters(self, peer: Peer, envelope: dict[str, Any]) -> None:
        peer.dropped = max(peer.dropped, envelope["dropped"])
        peer.converted = max(peer.converted, envelope["converted"])
        peer.tracker.skip_below(envelope["base"])

    def _apply(self, peer: Peer, envelope: dict[str, Any], live: bool = True) -> None:
        """Account for one journaled record or goodbye (live, or read back after a restart).
        The backends read the record itself from the journal."""
        peer.tracker.accept(envelope["seq"])
        if envelope["kind"] == RECORD:
            self.stats.accepted += 1
            if envelope["step"] is not None:
                peer.last_step = envelope["step"]
            return
        peer.goodbye_seq = envelope["seq"]
        self._note_counters(peer, envelope)
        if live:
            _log.info(
                "rank %d said goodbye (%d dropped on the rank, %d values sent as repr)",
                peer.rank,
                peer.dropped,
                peer.converted,
            )
            self._event("rank_finished", rank=peer.rank, pid=peer.pid, dropped=peer.dropped)

    def _recover(self) -> None:
        """Read the journal back: every seq accepted before (the backends catch up on their
        own, each from its checkpoint)."""
        now = time.monotonic()
        total = 0
        for _, _, frame in self.journal.read(0, self.journal.durable_end):
            try:
                envelope = decode(frame)
            except ProtocolError:
                continue
            key = (envelope["run"], envelope["rank"], envelope["inc"])
            peer = self.ranks.get(key)
            if peer is None:
                peer = self.ranks.add(key, self._new_peer(envelope, quiet=True))
                peer.last_seen = now
            self._apply(peer, envelope, live=False)
            total += 1
        if total:
            _log.info(
                "journal %s: %d entries from %d rank incarnations already accepted",
                self.journal.path,
                total,
                len(self.ranks),
            )

    def _reject(self, error: ProtocolError) -> None:
        self.stats.rejected[error.reason] += 1
        if self.stats.rejected[error.reason] == 1:
            _log.warning("rejected a frame (%s); further ones of this kind are only counted", error)

    # -- liveness and exit ---------------------------------------------------------------

    def _event(self, event: str, **fields: Any) -> None:
        """Append one line to ``ranklog-events.jsonl``: joins, goodbyes, silences, disk."""
        line = {"time": time.time(), "event": event, **fields}
        try:
            with open(self.output_dir / EVENTS_FILE, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError:
            pass  # the event is in the collector's log too; a full disk must not stop us

    def _check_liveness(self, now: float) -> None:
        for peer in self.ranks.newly_silent(now, self.silence_timeout):
            _log.warning(
                "rank %d (host %s, pid %d) has been silent for %.0fs; counting it as gone",
                peer.rank,
                peer.host,
                peer.pid,
                now - peer.last_seen,
            )
            self._event("rank_silent", rank=peer.rank, pid=peer.pid, last_step=peer.last_step)

    def _all_done(self, now: float) -> bool:
        world_size = self.world_size or self.ranks.largest_world_size()
        done = self.ranks.all_done(world_size, now, self._started_at, self.silence_timeout)
        absent = self.ranks.never_seen(world_size)
        if done and absent and not self._absent_reported:
            self._absent_reported = True
            _log.warning(
                "rank(s) %s never connected within %.0fs; counting them as gone",
                ", ".join(map(str, absent)),
                self.silence_timeout,
            )
        return done

    def _log_status(self, rate: float) -> None:
        _log.info(
            "%.0f records/s; %d accepted, %d duplicates dropped; %s; rejected %s",
            rate,
            self.stats.accepted,
            self.stats.duplicates,
            self.ranks.status(),
            dict(self.stats.rejected) or 0,
        )

    def _drain(self) -> bool:
        clean = self._backends is not None and self._backends.drain(
            self.journal.durable_end, self.drain_timeout
        )
        self._log_status(0.0)
        _log.info("collector stopped: %d records accepted", self.stats.accepted)
        return clean

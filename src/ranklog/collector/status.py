"""The job as the collector sees it, for ``ranklog top`` and ``/metrics``.

:class:`Watch` runs in the receive loop: once a second it updates the ranks' progress
(:mod:`ranklog.collector.progress`), notes stalls, and publishes a snapshot (a plain dict,
swapped in whole, so the Prometheus thread reads it without locks). The loop also answers
``ranklog top`` on a status socket: a ZeroMQ REP socket on a free loopback port, whose
address the collector writes into ``.ranklog/status.json`` of its output dir while it listens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import zmq

from ranklog.collector.events import Event
from ranklog.collector.progress import MAX_WATCHED, Progress, state
from ranklog.journal import STATE_DIR
from ranklog.pipe import checkpoint_path

if TYPE_CHECKING:
    from ranklog.collector.peers import Peer
    from ranklog.collector.settings import ServeSettings
    from ranklog.collector.store import Store

_log = logging.getLogger(__name__)
STATUS_FILE = Path(STATE_DIR, "status.json")
_PUBLISH_EVERY = 1.0


class StatusSocket:
    """A REP socket on loopback that answers each JSON request with ``answer(request)``;
    its address is in ``path`` while it is open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps({"endpoint": self.endpoint, "pid": os.getpid()}))
            os.replace(temporary, path)
        except OSError as exc:  # top can still --connect; the address is in the log
            _log.warning("cannot write %s (%s)", path, exc.strerror or exc)

    def serve(self, answer: Any) -> None:
        """Answer the requests that have arrived, without waiting."""
        # EVENTS, not poll(0): this runs every pass of the receive loop.
        while cast(int, self._sock.get(zmq.EVENTS)) & zmq.POLLIN:
            try:
                request = json.loads(self._sock.recv(zmq.NOBLOCK))
                reply = answer(request if isinstance(request, dict) else {})
            except zmq.Again:
                return
            except ValueError as exc:
                reply = {"error": f"expected a JSON request: {exc}"}
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send(json.dumps(reply, default=repr).encode(), zmq.NOBLOCK)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("endpoint") == self.endpoint:
                self.path.unlink()
        self._sock.close()
        self._context.term()


class Watch:
    """Progress, stalls, the published snapshot, the status socket and ``/metrics``."""

    def __init__(self, store: Store, settings: ServeSettings, now: float) -> None:
        self.store = store
        self.progress = Progress(store.ranks, settings.stall_timeout, settings.job_stall_timeout)
        store.ranks.watched.extend(settings.export_metrics[:MAX_WATCHED])
        self.export_metrics = tuple(settings.export_metrics)
        self._next = now
        self._rate = (now, store.stats.accepted, 0.0)
        self.latest: dict[str, Any] = self.snapshot(now)
        self._socket = StatusSocket(settings.backends.output_path / STATUS_FILE)
        self._exporter: Any = None
        try:
            if settings.metrics_port is not None:
                from ranklog.collector.prometheus import serve_metrics

                self._exporter = serve_metrics(settings.metrics_host, settings.metrics_port, self)
        except BaseException:
            self._socket.close()
            raise
        # Once everything is up: a start-up failure's reason is the last line a user reads.
        _log.info("status for `ranklog top` on %s", self._socket.endpoint)

    def tick(self, now: float) -> list[Event]:
        """Once a second, progress and a new snapshot; answer ``ranklog top`` at any time."""
        events: list[Event] = []
        if now >= self._next:
            self._next = now + _PUBLISH_EVERY
            events = self.progress.check(now)
            self.latest = self.snapshot(now)
        self._socket.serve(self._answer)
        return events

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        names = request.get("metrics") or []
        watched = self.store.ranks.watched
        for name in names:
            if isinstance(name, str) and name not in watched and len(watched) < MAX_WATCHED:
                watched.append(name)
        return self.snapshot(time.monotonic(), [n for n in names if isinstance(n, str)])

    def snapshot(self, now: float, metrics: list[str] | None = None) -> dict[str, Any]:
        """The job now: its ranks' rows, throughput and each backend's lag."""
        stats = self.store.stats
        since, accepted, rate = self._rate
        if now - since >= _PUBLISH_EVERY / 2:
            rate = (stats.accepted - accepted) / (now - since)
            self._rate = (now, stats.accepted, rate)
        job = self.progress.job_ranks
        lead = max((p.progress.step for p in job.values() if p.progress.step is not None),
                   default=None)  # fmt: skip
        names = metrics if metrics is not None else list(self.export_metrics)
        return {
            "run": self.progress.job,
            "time": time.time(),
            "records_total": stats.accepted,
            "records_per_s": round(rate, 1),
            "duplicates": stats.duplicates,
            "rejected": sum(stats.rejected.counts.values()),
            "leader_step": lead,
            "stall_timeout": self.progress.stall_timeout,
            # Seconds since the job's last step while it counts as hung (hung.py), else None.
            "job_stalled_s": self.progress.hung.stalled_for(now),
            "backends": self._backends(),
            "ranks": [_row(peer, lead, now, names) for peer in job.values()],
        }

    def _backends(self) -> list[dict[str, Any]]:
        """Each backend's lag: the journal's durable end beyond its last checkpoint."""
        durable = self.store.journal.durable_end
        state_dir = self.store.settings.output_path / STATE_DIR
        rows = []
        for name in self.store.backends.names:
            try:
                saved = json.loads(checkpoint_path(state_dir, name).read_text())
                offset = int(saved["offset"])
            except (OSError, ValueError, KeyError, TypeError):
                offset = 0
            rows.append({"name": name, "offset": offset, "lag_bytes": max(0, durable - offset)})
        return rows

    def close(self) -> None:
        if self._exporter is not None:
            self._exporter.shutdown()
            self._exporter.server_close()
        self._socket.close()


def _row(peer: Peer, lead: int | None, now: float, metrics: list[str]) -> dict[str, Any]:
    cadence = peer.progress
    step = cadence.step if cadence.step is not None else peer.last_step
    return {
        "rank": peer.rank,
        "host": peer.host,
        "pid": peer.pid,
        # A launch mistake follows the state (top styles the state by its first word).
        "state": f"{state(peer)}: {peer.mistake}" if peer.mistake else state(peer),
        "mistake": peer.mistake or None,
        "step": step,
        "steps_per_s": None if cadence.rate is None else round(cadence.rate, 3),
        "lag": None if lead is None or step is None else lead - step,
        "relative": _score(cadence.relative),
        "individual": _score(cadence.individual),
        "dropped": peer.dropped,
        "resent": peer.resent,
        "heard_s_ago": round(max(0.0, now - peer.last_seen), 1),
        "metrics": {name: cadence.values.get(name) for name in metrics},
    }


def _score(score: float | None) -> float | None:
    return None if score is None else round(score, 3)

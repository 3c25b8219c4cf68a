"""The collector's two entry points, :func:`serve` (``ranklog collect``) and :func:`replay`
(``ranklog replay``), and :class:`Collector`, the library object over them."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ranklog.collector import ownership
from ranklog.collector.launch import LaunchCheck
from ranklog.collector.liveness import Liveness
from ranklog.collector.receive import receive
from ranklog.collector.router import Router
from ranklog.collector.settings import DEFAULT_BIND, BackendSettings, ServeSettings
from ranklog.collector.spills import ingest_spills
from ranklog.collector.stats import StatusLine
from ranklog.collector.status import Watch
from ranklog.collector.store import Store
from ranklog.errors import ConfigError
from ranklog.journal import STATE_DIR

_log = logging.getLogger(__name__)
_POLL_MS = 100
_SPILL_SCAN = 2.0  # seconds between looks for spill files that appeared while serving
_SPILL_WAIT_AT_EXIT = 10.0

__all__ = ["DEFAULT_BIND", "Collector", "replay", "serve"]


def serve(
    settings: ServeSettings,
    stop: threading.Event,
    on_listening: Callable[[str], None] | None = None,
) -> int:
    """Listen, serve until ``stop`` is set (or, with ``exit_when_done``, every rank is
    done), drain the backends, and return the exit code: 0 if every backend drained."""
    output_dir = settings.backends.output_path
    output_dir.mkdir(parents=True, exist_ok=True)
    resumed = ownership.claim(output_dir)
    try:
        store = Store(settings.backends)
    except BaseException:
        ownership.release(output_dir)
        raise
    if resumed:
        job = store.ranks.resume_latest_job()
        _log.warning(
            "the last collector on %s did not stop cleanly; continuing its job %s (the "
            "goodbyes its ranks said count)",
            output_dir,
            job,
        )
    listening = False
    try:
        ingest_spills(store, time.monotonic())  # before listening: what ranks left last time
        with Router(settings) as router:
            watch = Watch(store, settings, time.monotonic())
            listening = True
            try:
                _log.info(
                    "ranklog collector listening on %s (backends: %s, output: %s)",
                    router.endpoint,
                    ", ".join(store.backends.names) or "none",
                    settings.backends.output_dir,
                )
                if on_listening is not None:
                    on_listening(router.endpoint)
                _serve(router, store, settings, stop, watch)
                store.events.write(store.stats.joins.tick(store.ranks, float("inf")))  # the last
                # What the last ranks left: a rank whose goodbye says it spilled lets go of
                # its file as it exits, just after the goodbye. No wait for other files.
                spilled = any(peer.live and peer.spilled for peer in store.ranks)
                wait = _SPILL_WAIT_AT_EXIT if spilled else 0.0
                ingest_spills(store, time.monotonic(), wait=wait)
            finally:
                watch.close()
    finally:
        # Also when listening failed: the backends' process must not outlive the loop. Then
        # no closing lines: the reason (raised) is the last line a user reads.
        clean = store.close(quiet=not listening)
        ownership.release(output_dir)
    return 0 if clean else 1


def _serve(
    router: Router, store: Store, settings: ServeSettings, stop: threading.Event, watch: Watch
) -> None:
    """The receive loop: receive, journal, acknowledge; then the backends, liveness,
    progress, status and the exit rule, once per pass."""
    now = time.monotonic()
    status = StatusLine(store.stats, store.ranks, settings.status_interval, now)
    liveness = Liveness(
        store.ranks,
        settings.backends.world_size,
        settings.silence_timeout,
        now,
        settings.connect_timeout if settings.exit_when_done else None,
    )
    if settings.exit_when_done:
        status.waiting_for = liveness.waiting_for
    status.stragglers = watch.progress.stragglers
    launch = LaunchCheck(store.ranks, settings.backends.world_size)
    last_message_at = 0.0
    scan_at = now + _SPILL_SCAN
    # Still our parent? (Once it exits, this process is handed to another.)
    parent_pid = settings.parent_pid if settings.exit_when_done else None
    while not stop.is_set():
        messages = router.receive(_POLL_MS)
        if messages:
            now = last_message_at = time.monotonic()
            received = receive(messages, store.ranks, store.stats, now)
            store.commit(received, now)
            router.send(received.acks())
        # After the commit: the backends read on to what is durable (an end the pipe could
        # not take then goes out on a later pass).
        store.advance()
        now = time.monotonic()
        if now >= scan_at:
            scan_at = now + _SPILL_SCAN
            ingest_spills(store, now)
        if parent_pid is not None and os.getppid() != parent_pid:
            liveness.parent_exited(parent_pid)
            parent_pid = None
        store.events.write(store.stats.joins.tick(store.ranks, now))  # joins left over
        store.events.write(router.refusals())
        store.events.write(launch.check(now))
        store.events.write(liveness.newly_silent(now))
        store.events.write(watch.tick(now))
        status.tick(now)
        if settings.exit_when_done and liveness.may_exit(now, last_message_at):
            # A rank counted gone since the last once-a-second look is said before the end.
            store.events.write(liveness.newly_silent(now, at_once=True))
            _log.info("every rank finished; draining and exiting")
            return


def replay(settings: BackendSettings, *, from_start: bool = False) -> int:
    """Bring the backends up to date from the journal without listening: backfill a
    backend added later, or one that failed; ingest what ranks spilled first (unless a
    collector serves the dir: it does that itself). ``from_start`` rebuilds them from the
    journal's first entry. Returns 0 if every backend drained.

    Refused (ConfigError) while a collector serves the dir: its backends follow the journal
    already, and two writers of the same files would write records twice."""
    if not (settings.output_path / STATE_DIR).is_dir():
        missing = not settings.output_path.exists()
        raise ConfigError(
            f"nothing to replay: {settings.output_dir} "
            + ("does not exist" if missing else f"holds no {STATE_DIR}/ (no collector wrote there)")
        )
    pid = ownership.live_owner(settings.output_path)
    if pid is not None:
        raise ConfigError(
            f"a collector (pid {pid}) is serving {settings.output_dir} and keeps its backends "
            "up to date; run `ranklog replay` after it stops"
        )
    store = Store(settings, from_start=from_start)
    ingest_spills(store, time.monotonic())  # it logs each file it ingests
    what = f"replay finished (backends: {', '.join(store.backends.names) or 'none'})"
    return 0 if store.close(what) else 1


class Collector:
    """Receive every rank's records and run the logging backends on them.

    >>> with Collector("tcp://127.0.0.1:5555", output_dir="logs") as collector:  # doctest: +SKIP
    ...     ...  # ranks log; records land in logs/*.jsonl

    ``logger_types`` picks InstructLab's backends (``async``, ...); ``config`` instead names
    a dictConfig YAML/JSON file whose handlers run here. With ``exit_when_done`` the collector
    stops once every one of ``world_size`` ranks said goodbye or stayed silent for
    ``silence_timeout`` seconds. Binding TCP beyond loopback needs ``allow_remote``.
    ``policy`` (``"tensorboard=mean,wandb=rank0"``) picks each backend's rank policy; a
    reducing one waits ``policy_timeout`` seconds for missing ranks. The defaults are
    :mod:`ranklog.collector.settings`'.
    """

    def __init__(
        self,
        bind: str = ServeSettings.bind,
        *,
        output_dir: str | Path = BackendSettings.output_dir,
        logger_types: str | list[str] = BackendSettings.logger_types,
        run_name: str | None = BackendSettings.run_name,
        config: str | Path | None = BackendSettings.config,
        world_size: int | None = BackendSettings.world_size,
        exit_when_done: bool = ServeSettings.exit_when_done,
        silence_timeout: float = ServeSettings.silence_timeout,
        drain_timeout: float = BackendSettings.drain_timeout,
        status_interval: float = ServeSettings.status_interval,
        allow_remote: bool = ServeSettings.allow_remote,
        policy: str | Mapping[str, str] | None = BackendSettings.policy,
        policy_timeout: float = BackendSettings.policy_timeout,
        curve_secret: str | Path | None = ServeSettings.curve_secret,
        curve_allow: str | Path | None = ServeSettings.curve_allow,
    ) -> None:
        backends = BackendSettings(
            output_dir=output_dir,
            logger_types=logger_types,
            run_name=run_name,
            config=config,
            world_size=world_size,
            policy=policy,
            policy_timeout=policy_timeout,
            drain_timeout=drain_timeout,
        )
        self.settings = ServeSettings(
            backends,
            bind=bind,
            exit_when_done=exit_when_done,
            silence_timeout=silence_timeout,
            status_interval=status_interval,
            allow_remote=allow_remote,
            curve_secret=Path(curve_secret) if curve_secret else None,
            curve_allow=Path(curve_allow) if curve_allow else None,
        )
        self.endpoint: str | None = None  # what it bound, once it listens
        self.exit_code: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def request_stop(self) -> None:
        """Ask the receive loop to stop, drain the backends and return (signal-safe)."""
        self._stop.set()

    def start(self) -> Collector:
        """Run the collector on a background thread; return once it listens."""
        self._thread = threading.Thread(target=self.run, name="ranklog-collector", daemon=True)
        self._thread.start()
        while self.endpoint is None:
            if not self._thread.is_alive():
                raise ConfigError("collector failed to start; see the log above")
            time.sleep(0.05)
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
        self.exit_code = serve(self.settings, self._stop, self._listening)
        return self.exit_code

    def _listening(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def replay(self, *, from_start: bool = False) -> int:
        """:func:`replay` with this collector's backends (``ranklog replay``)."""
        self.exit_code = replay(self.settings.backends, from_start=from_start)
        return self.exit_code

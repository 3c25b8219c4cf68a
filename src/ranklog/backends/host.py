"""The backends' own process: the collector's logger tree, fed from the journal.

The collector's receive loop and the backends used to share one interpreter, and so one
core: decoding, LogRecords and the backends' formatting all queued for the same GIL as
receiving and journaling. Here they run in a child process that follows the journal: the
collector tells it, one line on its stdin per commit, how far the journal is durable
(``ranklog.pipe``), and each backend's runner reads on from its checkpoint to there
(``runner.py``). The collector's side of this is ``ranklog.collector.backend_process``.

A collector that dies (kill -9) closes the pipe; the child then stops at once, and the next
collector resumes every backend from its checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ranklog.errors import ConfigError
from ranklog.journal import STATE_DIR, first_offset, journal_path, prune
from ranklog.pipe import BackendSpec, read_announcement
from ranklog.reporting import alert_to, log_to_stderr, terminal_alerts

if TYPE_CHECKING:
    from ranklog.backends.runner import Runner

_log = logging.getLogger(__name__)
_PRUNE_EVERY = 1.0  # seconds; about as often as backends checkpoint


class _Retention:
    """Deletes the journal's oldest segments beyond ``retention`` bytes once every backend
    here has checkpointed past them. Only this process knows the backends' checkpoints;
    a backend that is not here (one a later `ranklog replay` adds) is bounded by retention."""

    def __init__(self, journal: Path, retention: int) -> None:
        self.journal = journal
        self.retention = retention
        self._next = 0.0
        self._failed = False

    def __call__(self, backends: list[Runner], *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        self._next = now + _PRUNE_EVERY
        keep_from = min((backend.feed.needed_from() for backend in backends), default=1 << 62)
        try:
            deleted = prune(self.journal, self.retention, keep_from)
        except OSError as exc:
            if not self._failed:
                _log.warning("cannot delete old journal segments (%s)", exc)
            self._failed = True
            return
        if deleted:
            _log.info(
                "journal retention: deleted %d segment(s) every backend had read; the "
                "journal now starts at offset %d",
                len(deleted),
                first_offset(self.journal),
            )


def _absolute(path: str) -> str:
    return str(Path(path).absolute())


def _serve(spec: BackendSpec, ready: TextIO) -> int:
    from ranklog.backends.registry import install_backends, load_config_file, metric_logging_config
    from ranklog.backends.wandb import WandbHandler

    # Absolute paths: the files a checkpoint lists must not depend on where the collector
    # was started (checkpoint.py stores those in the output dir relative to it).
    output_dir = Path(spec.output_dir).absolute()
    options = {
        backend: {arg: _absolute(v) if arg == "log_dir" else v for arg, v in args.items()}
        for backend, args in spec.options.items()
    }
    config = (
        load_config_file(spec.config)
        if spec.config
        else metric_logging_config(spec.loggers, spec.run_name, output_dir, options)
    )
    backends = install_backends(
        config,
        spec.policies,
        world_size=spec.world_size,
        policy_timeout=spec.policy_timeout,
    )
    if spec.alert_fd is not None:  # the embedded collector's: rank 0's terminal
        # Only now: dictConfig (in install_backends) closes every handler already there.
        alert_to(spec.alert_fd, spec.alert_log)
    for backend in backends:
        if isinstance(backend.sink.handler, WandbHandler):  # a finished run's wait, in the bound
            backend.sink.handler.close_timeout = spec.drain_timeout
        backend.attach_journal(
            journal_path(output_dir), output_dir / STATE_DIR, from_start=spec.from_start
        )
    ready.write(json.dumps({"backends": [backend.name for backend in backends]}) + "\n")
    ready.close()
    # Each backend decodes batches of envelopes that refcounting frees a moment later: at
    # its default gen-0 threshold (700) the cyclic collector would scan them several times
    # per batch for nothing. What startup loaded (SDKs included) stays out of collections.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    retention = _Retention(journal_path(output_dir), spec.journal_retention)
    for line in sys.stdin:
        end, drain = read_announcement(line)
        for backend in backends:
            backend.advance(end)
        retention(backends)
        if drain:
            break
    else:
        # The collector is gone without a drain (killed): stop now. Every checkpoint on disk
        # is consistent, and the next collector resumes from them.
        os._exit(1)
    deadline = time.monotonic() + spec.drain_timeout
    # All drain at once, so a hung backend does not use up the others' share of the bound.
    for backend in backends:
        backend.request_close()
    clean = all([backend.close_within(deadline) for backend in backends])
    retention(backends, now=float("inf"))
    if any(backend.abandoned for backend in backends):
        _exit_abandoning(backends)
    return 0 if clean else 1


def _exit_abandoning(backends: list[Runner]) -> None:
    """Leave the process now, without the backends that did not drain in time.

    An abandoned backend may hold its handler's lock (logging.shutdown would wait on it at
    exit) or an SDK exit hook that never returns; everything else is flushed and closed
    already, so leave without running those hooks. An SDK's hook that completes a healthy
    run on disk (W&B's) gets a bounded chance first, unless it is the one hung."""
    abandoned = [backend for backend in backends if backend.abandoned]
    _log.error(
        "exiting without the abandoned backend(s): %s",
        ", ".join(str(backend.name) for backend in abandoned),
    )
    hung = {type(backend.sink.handler) for backend in abandoned}
    teardowns = {
        type(backend.sink.handler): backend.sink.exit_teardown
        for backend in backends
        if backend.sink.exit_teardown is not None and type(backend.sink.handler) not in hung
    }
    for teardown in teardowns.values():
        teardown(2.0)
    alerts = terminal_alerts()
    if alerts is not None:  # its lines out first (bounded): the user's terminal says why
        alerts.close()
    sys.stderr.flush()
    os._exit(1)


def main() -> int:
    # The collector drives this process through its stdin; a Ctrl-C meant for the
    # collector (sent to the whole process group) must not cut the backends short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Only the ready line goes to the collector; anything an SDK prints goes to stderr.
    ready = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    spec = BackendSpec.from_line(sys.stdin.readline())
    log_to_stderr(spec.log_level)
    try:
        return _serve(spec, ready)
    except ConfigError as exc:
        ready.write(json.dumps({"error": str(exc)}) + "\n")
        return 2
    finally:
        with contextlib.suppress(OSError):
            ready.close()


if __name__ == "__main__":
    sys.exit(main())

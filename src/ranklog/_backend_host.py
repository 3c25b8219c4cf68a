"""The backends' own process: the collector's logger tree, fed from the journal.

The collector's receive loop and the backends used to share one interpreter, and so one
core: decoding, LogRecords and the backends' formatting all queued for the same GIL as
receiving and journaling. Here they run in a child process that follows the journal: the
collector tells it, one line on its stdin per commit, how far the journal is durable, and
each backend reads on from its checkpoint to there (``_fanout.py``).

    parent -> child stdin:  one JSON line (the spec), then "<durable end>\\n" per commit,
                            then "drain <durable end>\\n"
    child -> parent stdout: one JSON line once the backends run: {"backends": [names]},
                            or why they cannot: {"error": "..."}
    exit status:            0 every backend drained and closed, 1 one did not, 2 bad config

A collector that dies (kill -9) closes the pipe; the child then stops at once, and the next
collector resumes every backend from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ranklog._errors import ConfigError

_log = logging.getLogger("ranklog.collector")
_EXIT_GRACE = 10.0  # beyond the drain bound: W&B's bounded teardown, interpreter exit


def log_to_stderr(level: int) -> None:
    """The collector's own lines (``ranklog`` loggers) to stderr; the root logger and the
    rest of the tree belong to the backends."""
    log = logging.getLogger("ranklog")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s ranklog %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


class BackendProcess:
    """The collector's handle on the backends' process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        env = dict(os.environ)
        # The child imports what this process can: ranklog itself, a config's handler modules.
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "import sys, ranklog._backend_host as h; sys.exit(h.main())"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin = self._proc.stdin
        self._stdin.write(json.dumps(spec).encode() + b"\n")
        self._stdin.flush()
        ready = json.loads(self._proc.stdout.readline() or "{}")
        self._proc.stdout.close()
        if "backends" not in ready:
            code = self._proc.wait()
            raise ConfigError(ready.get("error", f"the backends' process exited (status {code})"))
        self.names: list[str] = ready["backends"]
        self._lost = False
        self._announced = -1
        # Announcements never block the receive loop: one that does not fit in the pipe is
        # left for the next call, which carries the latest end.
        os.set_blocking(self._stdin.fileno(), False)

    def advance(self, durable_end: int) -> None:
        """Tell the backends the journal is durable up to ``durable_end`` (cheap to call
        again with the same end: only news is written)."""
        if durable_end <= self._announced:
            return
        try:
            os.write(self._stdin.fileno(), b"%d\n" % durable_end)
        except BlockingIOError:
            return  # the pipe is full: the next call tries again
        except OSError:
            self._report_lost()
        self._announced = durable_end

    def _report_lost(self) -> None:
        if not self._lost:
            self._lost = True
            _log.error(
                "the backends' process exited (status %s); the journal keeps every record: "
                "`ranklog replay` writes what they missed",
                self._proc.poll(),
            )

    def drain(self, durable_end: int, timeout: float) -> bool:
        """Let every backend read to ``durable_end`` and close within ``timeout`` seconds
        (the child abandons one that does not); True if all did."""
        deadline = time.monotonic() + timeout + _EXIT_GRACE
        command = b"drain %d\n" % durable_end
        try:
            # Non-blocking still: a child that stopped reading must not hang the collector.
            while True:
                try:
                    os.write(self._stdin.fileno(), command)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError from None
                    time.sleep(0.01)
            self._stdin.close()
            code = self._proc.wait(max(0.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, TimeoutError):  # (TimeoutError is an OSError)
            _log.error("the backends' process did not exit; killing it")
            self._proc.kill()
            self._proc.wait()
            return False
        except OSError:  # the pipe is gone: so is the child
            self._report_lost()
            self._proc.kill()
            self._proc.wait()
            return False
        return code == 0 and not self._lost


def _serve(spec: dict[str, Any], ready: Any) -> int:
    from ranklog._backends import install_backends, load_config_file, metric_logging_config
    from ranklog._journal import STATE_DIR, journal_path

    output_dir = Path(spec["output_dir"])
    config = (
        load_config_file(spec["config"])
        if spec["config"]
        else metric_logging_config(spec["loggers"], spec["run_name"], output_dir)
    )
    backends = install_backends(
        config,
        spec["policies"],
        world_size=spec["world_size"],
        policy_timeout=spec["policy_timeout"],
    )
    for backend in backends:
        backend.attach_journal(
            journal_path(output_dir), output_dir / STATE_DIR, from_start=spec["from_start"]
        )
    ready.write(json.dumps({"backends": [backend.name for backend in backends]}) + "\n")
    ready.close()
    for line in sys.stdin:
        command, _, end = line.strip().rpartition(" ")
        for backend in backends:
            backend.advance(int(end))
        if command == "drain":
            break
    else:
        # The collector is gone without a drain (killed): stop now. Every checkpoint on disk
        # is consistent, and the next collector resumes from them.
        os._exit(1)
    deadline = time.monotonic() + spec["drain_timeout"]
    # All drain at once, so a hung backend does not use up the others' share of the bound.
    for backend in backends:
        backend.request_close()
    clean = all([backend.close_within(deadline) for backend in backends])
    abandoned = [backend for backend in backends if backend.abandoned]
    if abandoned:
        from ranklog._wandb import WandbHandler, teardown_within

        # An abandoned backend may hold its handler's lock (logging.shutdown would wait on it
        # at exit) or an SDK exit hook that never returns; everything else is flushed and
        # closed already, so leave without running those hooks. W&B's hook is the one that
        # completes a healthy run on disk: give it a bounded chance first.
        _log.error(
            "exiting without the abandoned backend(s): %s",
            ", ".join(str(backend.name) for backend in abandoned),
        )
        if not any(isinstance(backend.inner, WandbHandler) for backend in abandoned):
            teardown_within(2.0)
        sys.stderr.flush()
        os._exit(1)
    return 0 if clean else 1


def main() -> int:
    # The collector drives this process through its stdin; a Ctrl-C meant for the
    # collector (sent to the whole process group) must not cut the backends short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Only the ready line goes to the collector; anything an SDK prints goes to stderr.
    ready = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    spec = json.loads(sys.stdin.readline())
    log_to_stderr(spec["log_level"])
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

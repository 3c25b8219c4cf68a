"""A rank's end of life on real processes: a backlog at exit, a collector nobody hears."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.conftest import CollectorProcess
from tests.ranks import REPO, finish, start_ranks
from tests.test_delivery import assert_exactly_once, free_endpoint


@contextlib.contextmanager
def throttled(pid: int, stopped: float, running: float) -> Iterator[None]:
    """A collector on a loaded machine: stopped (SIGSTOP) for ``stopped`` seconds, then
    running for ``running``, over and over."""
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            os.kill(pid, signal.SIGSTOP)
            done.wait(stopped)
            os.kill(pid, signal.SIGCONT)
            done.wait(running)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        os.kill(pid, signal.SIGCONT)


class TestExitWithBacklog:
    """Ranks exit (``logging.shutdown()``) right after logging more than the collector can
    take within the close timeout: close waits while acknowledgements progress."""

    def test_nothing_lost_and_collector_exits_promptly(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out, ranks, records = tmp_path / "out", 4, 30_000
        c = collector("--world-size", str(ranks), "--exit-when-done", "--logger-type",
                      "async,tensorboard", "--silence-timeout", "60", output_dir=out)  # fmt: skip
        # A tenth of the machine: absorbing the backlog takes well over the close timeout.
        with throttled(c.proc.pid, stopped=0.45, running=0.05):
            stats = finish(
                start_ranks(c.endpoint, ranks, records, "--metrics", "16", "--close-timeout",
                            "5", "--shutdown", "--spill-dir", str(out / ".ranklog" / "spill")),
                timeout=300,
            )  # fmt: skip
        last_rank = time.monotonic()
        assert c.wait(60) == 0, c.log()
        assert time.monotonic() - last_rank < 30, "the collector waited for silence"
        assert all(s["held"] == 0 and s["dropped"] == 0 for s in stats), stats
        # The premise: acknowledgements took longer than the close timeout to catch up.
        assert max(s["close_s"] for s in stats) > 6, stats
        assert_exactly_once(out, ranks, records)
        assert not list((out / ".ranklog" / "spill").glob("*.spill"))  # delivered: gone
        assert "0 duplicates dropped" in c.log().splitlines()[-2], c.log()


class TestNobodyAnswers:
    """With no collector, the rank says so while it runs, and spills what it holds at exit."""

    def test_silence_is_warned_before_the_last_step_and_the_rest_spilled(
        self, tmp_path: Path, local_spill_folder: Path
    ) -> None:
        endpoint = free_endpoint()  # nothing listens there
        proc = subprocess.run(
            [sys.executable, "-m", "tests.rank_worker", "--rank", "0", "--world-size", "1",
             "--records", "30", "--step-delay", "0.1", "--say-steps", "--silence-warning", "1",
             "--close-timeout", "0.5"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "RANKLOG_ENDPOINT": endpoint},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.splitlines()
        warned = next(i for i, line in enumerate(lines) if "no collector has answered" in line)
        assert endpoint in lines[warned]
        assert warned < lines.index("logged step 29"), proc.stderr
        spilled = list(local_spill_folder.glob("*.spill"))
        assert len(spilled) == 1 and str(spilled[0]) in proc.stderr, proc.stderr
        assert "30 record(s) are spilled to" in proc.stderr

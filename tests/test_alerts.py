"""The collector's warnings on the terminal the user watches: the embedded collector's reach
the torchrun job's own output (rank 0's stderr), one line each, rate-limited."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ranklog.reporting import RateLimit
from tests.test_wandb import no_wandb_account
from tests.test_watch import torchrun


class TestOnTheTrainingTerminal:
    """A stalled rank is said where torchrun was started, not only in the collector's log."""

    def test_stalled_and_resumed_rank_in_the_torchrun_output(self, tmp_path: object) -> None:
        out = f"{tmp_path}/out"
        job = torchrun({"kwargs": {"output_dir": out}, "env": {"RANKLOG_STALL_TIMEOUT": "3"},
                        "steps": 200, "step_delay": 0.05,
                        "sleep": {"rank": 1, "step": 20, "seconds": 8}})  # fmt: skip
        output, _ = job.communicate(timeout=180)
        assert job.returncode == 0, output
        stalled = re.findall(r"^.*ranklog collector: rank 1 \(host .*stalled$", output, re.M)
        assert len(stalled) == 1, output
        assert re.search(r"ranklog collector: rank 1 is stepping again", output), output

    def test_a_backend_that_cannot_start_in_the_torchrun_output(self, tmp_path: Path) -> None:
        """W&B fails in the backends' process (no API key: a real wandb.init failure); the
        line that says so reaches rank 0's terminal, once, and the other backends go on."""
        out = f"{tmp_path}/out"
        job = torchrun({"kwargs": {"loggers": ["async", "wandb"], "output_dir": out},
                        "env": no_wandb_account(tmp_path), "steps": 20})  # fmt: skip
        output, _ = job.communicate(timeout=180)
        assert job.returncode == 0, output
        failed = re.findall(r"^ranklog collector: backend wandb: wandb\.init failed \(.*$",
                            output, re.M)  # fmt: skip
        assert len(failed) == 1, output
        assert "No API key" in failed[0], output
        assert len(Path(out, "training_params_and_metrics_global0.jsonl").read_text().splitlines())


def record(message: str, created: float, *args: object) -> logging.LogRecord:
    log = logging.LogRecord("ranklog.test", logging.WARNING, __file__, 1, message, args, None)
    log.created = created
    return log


class TestRateLimit:
    """At most a few lines of a kind per minute; the next one shown counts those held back."""

    def test_held_back_lines_are_counted_on_the_next_one(self) -> None:
        limit = RateLimit(lines=3, window=60.0)
        shown = [limit.filter(record("rank %d is silent", t, t)) for t in range(10)]
        assert shown == [True] * 3 + [False] * 7
        assert limit.held_back() == 7
        assert limit.filter(record("job %s looks hung", 5.0, "x"))  # another kind: shown
        later = record("rank %d is silent", 61.0, 61)
        assert limit.filter(later)
        assert later.held_back == " (7 more like it not shown; see the log)"  # type: ignore[attr-defined]
        assert limit.held_back() == 0

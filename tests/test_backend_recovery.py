"""A backend goes back to its checkpoint (a crash of the backends' process, a full disk)
and still writes every record exactly once, whatever its rank policy holds or remembers.

Each phase of ``tests/backend_harness.py`` runs in a process of its own on a real journal
and real JSONL files; the phases that end in a crash leave them as kill -9 would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import read_jsonl
from tests.ranks import REPO


def phase(out: Path, scenario: str, number: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tests.backend_harness", str(out), scenario, number],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_files_not_reopened_after_a_restart_are_still_cut_back(tmp_path: Path) -> None:
    """Restart, checkpoint before rank 1's file is opened again, crash again: the file's
    unwritten-by-checkpoint tail must still be cut back, not kept and written again."""
    phase(tmp_path, "reopen", "1")
    phase(tmp_path, "reopen", "2")
    assert "clean" in phase(tmp_path, "reopen", "3")
    rank1 = read_jsonl(tmp_path / "training_params_and_metrics_global1.jsonl")
    assert [row["step"] for row in rank1] == [1, 3, 10, 11]


def test_mean_keeps_what_it_held_and_not_what_it_passed_on(tmp_path: Path) -> None:
    """mean holds the second dict of step 5 and passes a step-less record straight on; after
    a crash the held group still completes and the passed record is not written again."""
    phase(tmp_path, "reduce", "1")
    assert "clean" in phase(tmp_path, "reduce", "2")
    rows = read_jsonl(tmp_path / "all.jsonl")
    assert [row.get("note") for row in rows if "note" in row] == [1]
    assert [(row["step"], row["a"]) for row in rows if "a" in row] == [(5, 2.0), (6, 1.0)]
    assert [(row["step"], row["b"]) for row in rows if "b" in row] == [(5, 3.0)]


def test_first_remembers_every_step_it_saw(tmp_path: Path) -> None:
    """Every rank reported step 5 once; rank 0's second dict (val) passed first. After a
    crash, rank 1's val for step 5 must not pass as another "first"."""
    phase(tmp_path, "first", "1")
    assert "clean" in phase(tmp_path, "first", "2")
    rows = read_jsonl(tmp_path / "all.jsonl")
    assert [row["val"] for row in rows if "val" in row] == [10]
    assert [row["loss"] for row in rows if "loss" in row] == [0]


def test_hyperparameters_once_across_a_restart(tmp_path: Path) -> None:
    """Rank 0's hyper-parameters were written before the crash; rank 1's same ones after it
    must not be written again."""
    phase(tmp_path, "hparams", "1")
    assert "clean" in phase(tmp_path, "hparams", "2")
    rows = read_jsonl(tmp_path / "all.jsonl")
    assert [row["lr"] for row in rows if "lr" in row] == [0.1]
    assert [row["loss"] for row in rows if "loss" in row] == [1, 2]


def test_full_disk_rewind_rebuilds_the_policy(small_disk: Path) -> None:
    """A write fails on a full disk: the backend goes back to its checkpoint and reads the
    records again, with its policy as it was then (else first would drop them as seen)."""
    out = small_disk / "out"
    log = phase(out, "rewind", "1")
    assert "No space left on device" in log
    assert "clean" in log
    rows = read_jsonl(out / "all.jsonl")
    assert rows == [
        {"lr": 0.1, "timestamp": rows[0]["timestamp"]},
        {"loss": 1, "step": 1, "timestamp": rows[1]["timestamp"]},
    ]

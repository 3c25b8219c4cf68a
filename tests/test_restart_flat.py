"""Restart time stays flat in history: a collector on a dir whose journal holds 1,000,000
records reads its de-duplication snapshot, not the journal, and is ready about as soon as
on a fresh dir."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ranklog.collector.store import segment_bytes
from ranklog.journal import DEFAULT_RETENTION, Journal, journal_path
from ranklog.rank.encoder import RecordEncoder
from ranklog.rank.identity import RankIdentity
from ranklog.snapshots import snapshots
from ranklog.wire import GOODBYE
from tests.conftest import READY, start_collector
from tests.test_delivery import wait_for

# Times a restart against a fresh directory's: on a quiet machine, not beside another worker.
pytestmark = pytest.mark.serial
RANKS = 2
STEPS = 500_000  # per rank: 1,000,000 records in the journal
# One stdlib handler as the backend (any is one): catching up with a million records takes
# a third of JSONL's time, and readiness does not depend on the backend.
CONFIG = {"version": 1, "handlers": {"null": {"class": "logging.NullHandler"}},
          "root": {"handlers": ["null"], "level": "INFO"}}  # fmt: skip


def write_history(out: Path) -> int:
    """What a collector journals from ``RANKS`` ranks that logged ``STEPS`` steps each and
    said goodbye, written with the ranks' own encoder into the collector's own journal (in
    its segments, fsynced every 1,024 records as the collector does), without sockets.
    Returns the journal's end."""
    journal = Journal(journal_path(out), segment_bytes=segment_bytes(DEFAULT_RETENTION))
    record = logging.makeLogRecord({"name": "instructlab.training.metrics", "levelno": 20})
    for rank in range(RANKS):
        identity = RankIdentity(run_id="test", rank=rank, local_rank=rank, world_size=RANKS,
                                local_world_size=RANKS, host="history", pid=1000 + rank,
                                incarnation=f"history{rank}")  # fmt: skip
        encoder = RecordEncoder(identity)
        for step in range(STEPS):
            record.msg = {"loss": 1.0 / (step + 1) + rank, "train": {"tokens": step * 10}}
            record.step = step
            frame = encoder.record(step + 1, record)
            assert isinstance(frame, bytes)
            journal.append(frame)
            if step % 1024 == 1023:
                journal.sync()
                if journal.full:
                    journal.rotate()
        journal.append(encoder.control(GOODBYE, seq=STEPS + 1, spilled=0))
    journal.close()
    return journal.durable_end


def checkpointed(out: Path) -> int:
    """How far the backend has read the journal (its checkpoint)."""
    path = out / ".ranklog" / "backend-null.json"
    return int(json.loads(path.read_text())["offset"]) if path.exists() else 0


@pytest.fixture(scope="module")
def million(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output dir whose journal keeps 1,000,000 records, all handed to its backend, with
    the collector's own snapshot at the journal's end: one collector ran on it until its
    backend caught up, and stopped."""
    out = tmp_path_factory.mktemp("million") / "out"
    config = out.parent / "logging.json"
    config.write_text(json.dumps(CONFIG))
    end = write_history(out)
    c = start_collector(out, "--config", str(config), timeout=60)
    try:
        wait_for(lambda: checkpointed(out) == end, 90)
        c.terminate(signal.SIGTERM)
        assert c.wait(60) == 0, c.log()
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
    assert [offset for offset, _ in snapshots(journal_path(out))] == [end]
    return out


def ready_seconds(out: Path, config: Path, timeout: float = 30.0) -> float:
    """How long `ranklog collect` on ``out`` takes to say it listens (then stop it)."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / "ready.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ranklog", "collect", "--bind", "tcp://127.0.0.1:*",
             "--output-dir", str(out), "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        while not READY.search(log_path.read_text()):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() - started < timeout, "never ready"
            time.sleep(0.005)
        return time.monotonic() - started
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log_path.read_text()


class TestRestartFlat:
    """A restart reads the snapshot, not the 1,000,000 records before it."""

    def test_ready_in_at_most_twice_a_fresh_dirs_time(self, million: Path, tmp_path: Path) -> None:
        config = million.parent / "logging.json"
        end = checkpointed(million)
        fresh = min(ready_seconds(tmp_path / f"fresh{n}" / "out", config) for n in range(3))
        restart = min(ready_seconds(million, config) for _ in range(3))
        print(f"ready: fresh {fresh:.3f}s, with 1,000,000 records of history {restart:.3f}s")
        assert restart <= 2 * fresh
        assert "then 0 entries" in (million.parent / "ready.log").read_text()
        assert checkpointed(million) == end  # nothing was handed to the backend again

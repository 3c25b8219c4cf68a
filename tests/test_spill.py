"""Spill files: written whole and locked by the rank, ingested exactly once by the next
collector or ``ranklog replay``, also after a ``kill -9`` of the rank while it closes."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ranklog import ZMQSocketHandler
from ranklog.journal import pack_entry, read_file, spill_path
from ranklog.rank.spill import SpillFile, spill_folders
from tests.conftest import CollectorProcess, ranklog, read_jsonl
from tests.ranks import start_rank
from tests.test_delivery import assert_exactly_once, free_endpoint, replay, wait_for


class TestSpillFile:
    """The file: whole entries, a torn tail cut, a lock while its rank lives."""

    def test_entries_round_trip_and_a_torn_tail_is_cut(self, tmp_path: Path) -> None:
        spill = SpillFile.create([tmp_path], "r0.spill")
        assert spill.add([(1, b"\x81\xa1a\x01"), (2, b"\x81\xa1a\x02")]) == 2
        assert spill.add([(2, b"\x81\xa1a\x02"), (3, b"\x81\xa1a\x03")]) == 3  # 2 once
        spill.close()
        with open(tmp_path / "r0.spill", "ab") as f:
            f.write(pack_entry(b"\x81\xa1a\x04")[:-2])  # killed mid-write
        frames = list(read_file(tmp_path / "r0.spill"))
        assert frames == [b"\x81\xa1a\x01", b"\x81\xa1a\x02", b"\x81\xa1a\x03"]

    def test_locked_while_open(self, tmp_path: Path) -> None:
        spill = SpillFile.create([tmp_path], "r0.spill")
        fd = os.open(spill.path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            spill.close()
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)

    def test_output_dir_only_where_its_state_folder_exists(
        self, tmp_path: Path, local_spill_folder: Path
    ) -> None:
        wanted = spill_path(tmp_path / "out")
        assert spill_folders(wanted) == [local_spill_folder]  # not reachable: no .ranklog
        wanted.parent.mkdir(parents=True)
        assert spill_folders(wanted) == [wanted, local_spill_folder]


def _killed_while_closing(
    collector: Callable[..., CollectorProcess], out: Path, records: int
) -> None:
    """One rank delivers part of its records, then its collector stops answering (SIGSTOP):
    the rank closes, spills, and is killed (-9) once the spill file is there; the
    collector is killed too."""
    endpoint = free_endpoint()
    c = collector("--world-size", "1", bind=endpoint, output_dir=out)
    rank = start_rank(endpoint, 0, 1, records, "--rate", "2000", "--close-timeout", "60",
                      "--spill-dir", str(spill_path(out)))  # fmt: skip
    wait_for(lambda: "rank 0 joined" in c.log(), 30)
    time.sleep(0.5)
    c.terminate(signal.SIGSTOP)
    wait_for(lambda: any(p.stat().st_size for p in spill_path(out).glob("*.spill")), 60)
    time.sleep(0.3)  # the spill finished, or is on its way
    rank.kill()
    rank.wait(10)
    c.terminate(signal.SIGKILL)
    c.wait(10)
    assert list(spill_path(out).glob("*.spill"))


class TestKilledWhileClosing:
    """kill -9 during close(): the spill brings the rest, nothing twice."""

    def test_next_collector_ingests_the_spill(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out, records = tmp_path / "out", 4000
        _killed_while_closing(collector, out, records)
        c = collector(output_dir=out)
        assert "ingested spill" in c.log()  # before it listened
        c.terminate()
        assert c.wait(60) == 0, c.log()
        assert not list(spill_path(out).glob("*.spill"))
        assert_exactly_once(out, 1, records)

    def test_replay_ingests_the_spill(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out, records = tmp_path / "out", 4000
        _killed_while_closing(collector, out, records)
        (spilled,) = spill_path(out).glob("*.spill")
        kept = spilled.read_bytes()
        replay(out)
        assert not spilled.exists()
        assert_exactly_once(out, 1, records)
        spilled.write_bytes(kept)  # as if replay had died between journaling and deleting
        replay(out)
        assert not spilled.exists()
        assert_exactly_once(out, 1, records)

    def test_a_spill_appearing_while_serving_is_ingested(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        """The spill of a rank that gave up (its collector stopped), ingested by the same
        collector once it runs again, the goodbye having ended the rank at once."""
        out, records = tmp_path / "out", 3000
        c = collector("--world-size", "1", "--exit-when-done", "--silence-timeout", "600",
                      output_dir=out)  # fmt: skip
        rank = start_rank(c.endpoint, 0, 1, records, "--rate", "2000", "--close-timeout", "1",
                          "--spill-dir", str(spill_path(out)))  # fmt: skip
        wait_for(lambda: "rank 0 joined" in c.log(), 30)
        time.sleep(0.5)
        c.terminate(signal.SIGSTOP)
        _, err = rank.communicate(timeout=60)
        assert "are spilled to" in err, err
        c.terminate(signal.SIGCONT)
        assert c.wait(60) == 0, c.log()  # the goodbye (spilled) ended it, not a silence
        assert "ingested spill" in c.log(), c.log()
        assert_exactly_once(out, 1, records)


def test_exit_waits_only_for_the_spills_of_its_own_ranks(
    collector: Callable[..., CollectorProcess], tmp_path: Path
) -> None:
    """A spill file some other live process holds (locked) does not keep a collector whose
    ranks delivered everything from exiting; it stays for a later ingest."""
    out = tmp_path / "out"
    folder = spill_path(out)
    folder.mkdir(parents=True)
    foreign = folder / "other-job.spill"
    foreign.write_bytes(b"")
    with open(foreign, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        c = collector("--world-size", "1", "--exit-when-done", output_dir=out)
        rank = start_rank(c.endpoint, 0, 1, 200)
        rank.communicate(timeout=60)
        assert rank.returncode == 0
        assert c.wait(5) == 0, c.log()  # the wait for its own ranks' spills is 10 s
    assert foreign.exists()
    assert_exactly_once(out, 1, 200)


class TestExactCounts:
    """A drop, a spill and an ingest are counted exactly, and "this run" apart from what the
    output dir held before."""

    def test_drop_spill_ingest(self, tmp_path: Path) -> None:
        out = tmp_path / "out"
        spill_path(out).mkdir(parents=True)
        handler = ZMQSocketHandler(free_endpoint(), rank=0, world_size=1, run_id="counts",
                                   max_records=1_000, close_timeout=0.5,
                                   spill_dir=spill_path(out))  # fmt: skip
        log = logging.getLogger("test.counts")
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.INFO)
        for step in range(1_500):  # nobody listens: the oldest 500 are dropped
            log.info({"loss": 0.5}, extra={"step": step})
        with pytest.warns(RuntimeWarning) as caught:
            handler.close()
        said = str(caught[0].message)
        assert "could not deliver 1000 record(s)" in said, said
        assert "1000 record(s) are spilled to" in said, said
        assert "dropped 500 record(s) because its buffer was full" in said, said
        first = ranklog("replay", "--output-dir", str(out))
        assert first.returncode == 0, first.stderr
        assert re.search(r"ingested spill \S+: 1000 records accepted, 0 already", first.stderr)
        assert "rank-side drops 500," in first.stderr, first.stderr
        assert "(backends: async): 1000 records accepted in this run (1000 in this directory " \
            "in all)" in first.stderr, first.stderr  # fmt: skip
        rows = read_jsonl(out / "training_params_and_metrics_global0.jsonl")
        assert [row["step"] for row in rows] == list(range(500, 1_500))
        again = ranklog("replay", "--output-dir", str(out))
        assert "(backends: async): 0 records accepted in this run (1000 in this directory " \
            "in all)" in again.stderr, again.stderr  # fmt: skip

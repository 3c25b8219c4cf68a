"""A full output disk: setup fails fast in one line; mid-job, what cannot be journaled is
spilled to the rank's local folder, the job and its embedded collector end in bounded time,
and the README's recovery steps bring everything back, once."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ranklog.journal import spill_path
from tests.conftest import ranklog
from tests.test_delivery import assert_exactly_once, wait_for
from tests.test_sigterm import start_job

BEFORE, BURST = 100, 3000


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of the test's own (RANKLOG_REQUIRE_TMPFS=1: no mount fails)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}"
        if os.environ.get("RANKLOG_REQUIRE_TMPFS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 20))
                f.flush()
        except OSError:
            pass
    assert shutil.disk_usage(disk).free < 64 << 10
    return filler


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_setup_on_a_full_disk_fails_fast_in_one_line(disk: Path) -> None:
    out, talk = disk / "out", disk.parent / "talk"
    talk.mkdir()
    fill(disk)
    started = time.monotonic()
    job = start_job({"kwargs": {"output_dir": str(out)}, "dir": str(talk)})
    _, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - started < 30, "blocked in setup"  # torchrun itself takes some
    assert f"ConfigError: cannot write to the output dir {out}: No space left on device" in err
    assert not (out / "ranklog-collector.log").exists()  # no collector was started


def test_disk_filled_mid_job(disk: Path, tmp_path: Path, local_spill_folder: Path) -> None:
    out, talk = disk / "out", tmp_path / "talk"
    talk.mkdir()
    spec = {"kwargs": {"output_dir": str(out)}, "dir": str(talk), "before": BEFORE,
            "burst": BURST, "finish": True}  # fmt: skip
    job = start_job(spec)
    try:
        wait_for(lambda: all((talk / f"ready{r}").exists() for r in (0, 1)), 120)
        collector_pid = int((talk / "ready0").read_text())
        filler = fill(disk)
        (talk / "go").touch()
        started = time.monotonic()
        _, err = job.communicate(timeout=120)
        ended = time.monotonic()
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err[-3000:]
    assert ended - started < 45, "the job's exit took too long"
    files = []
    for rank in (0, 1):
        (line,) = [line for line in err.splitlines() if f"ranklog: rank {rank} could" in line]
        (path,) = re.findall(r"spilled to (\S+\.spill)", line)
        assert Path(path).parent == local_spill_folder, line
        assert f"({spill_path(out)} could not take it: [Errno 28] No space left" in line, line
        assert f"move the file into {out}/.ranklog/spill/, then run `ranklog replay" in line
        files.append(Path(path))
    # Freed 20 s after the ranks exit; the collector must be gone within 30 s of the
    # job's end or of the space returning.
    gone_at = None
    while gone_at is None and time.monotonic() < ended + 20:
        gone_at = None if alive(collector_pid) else time.monotonic()
        time.sleep(0.1)
    filler.unlink()
    freed = time.monotonic()
    while gone_at is None and time.monotonic() < freed + 30:
        gone_at = None if alive(collector_pid) else time.monotonic()
        time.sleep(0.1)
    assert gone_at is not None, "the embedded collector outlived its job"
    # The README's recovery steps.
    for path in files:
        shutil.move(path, spill_path(out) / path.name)
    replayed = ranklog("replay", "--output-dir", str(out), "--logger-type", "async")
    assert replayed.returncode == 0, replayed.stderr
    assert_exactly_once(out, 2, BEFORE + BURST)
    assert not list(spill_path(out).glob("*.spill"))


def test_a_goodbye_the_full_journal_refuses_still_ends_its_rank(disk: Path) -> None:
    """A rank that spilled and left sends its goodbye once: a journal that cannot take it
    (no room, not even in its last page) must not leave that rank unfinished, or the
    collector would wait out its silence after the job ended."""
    from ranklog.collector.receive import receive
    from ranklog.collector.settings import BackendSettings
    from ranklog.collector.store import Store
    from ranklog.rank.encoder import RecordEncoder
    from ranklog.rank.identity import detect_identity
    from ranklog.wire import GOODBYE, HELLO

    store = Store(BackendSettings(output_dir=disk / "out", logger_types="async", world_size=1))
    try:
        encoder = RecordEncoder(detect_identity(rank=0, world_size=1, run_id="job"))
        counters = {"dropped": 0, "converted": 0, "resent": 0}
        hello = encoder.control(HELLO, base=1, **counters)
        page = os.statvfs(disk).f_bsize
        used = store.journal.durable_end - store.journal.segment.start
        for pad in range(2 * page):  # the segment then ends on a page boundary
            record = logging.makeLogRecord({"msg": {"pad": "x" * pad}, "step": 0})
            frame = encoder.record(1, record)
            assert isinstance(frame, bytes)
            if (used + 8 + len(frame)) % page == 0:
                break
        assert store.commit(receive([(b"r", [hello, frame])], store.ranks, store.stats, 1.0), 1.0)
        fill(disk)
        goodbye = encoder.control(GOODBYE, seq=3, spilled=1, base=2, **counters)
        received = receive([(b"r", [goodbye])], store.ranks, store.stats, 2.0)
        assert not store.commit(received, 2.0)  # the journal could not take it
        (peer,) = list(store.ranks)
        assert peer.finished
    finally:
        store.close()


def test_a_spill_the_output_dir_stops_taking_moves_whole_to_the_next_folder(
    disk: Path, tmp_path: Path
) -> None:
    """A spill file begun in the output dir (close() spills first) that the disk then
    refuses: every record held goes to the rank's local folder, the partial file goes."""
    import msgpack

    from ranklog.journal import read_file
    from ranklog.rank.spill import spill_to

    output, local = disk / "spill", tmp_path / "local"
    output.mkdir()
    local.mkdir()
    items: list[tuple[int, bytes | Any]] = [
        (seq, msgpack.packb({"seq": seq, "pad": bytes(1000)})) for seq in range(1, 201)
    ]
    spill, failed = spill_to(None, [output, local], "r.spill", items[:10])
    assert spill.path.parent == output and failed is None
    fill(disk)
    spill, failed = spill_to(spill, [output, local], "r.spill", items)
    assert spill.path == local / "r.spill"
    assert failed is not None and failed[0] == output and "No space left" in str(failed[1])
    assert list(read_file(spill.path)) == [frame for _, frame in items]
    assert not (output / "r.spill").exists()
    spill.close()

"""Power cuts under LazyFS: what the collector acknowledged survives losing the page cache.

kill -9 keeps the page cache, so only a filesystem that drops unsynced writes can tell a
durable acknowledgement from one that is not. Each cut kills the collector's whole process
tree, drops every write LazyFS holds unsynced, mounts again and starts a new collector on
the same directory, while ranks (standing for other machines) keep logging.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ranklog.journal import journal_path, segments, spill_path
from ranklog.snapshots import snapshots
from tests.conftest import CollectorProcess, process_tree
from tests.lazyfs import LazyFS, lazyfs_binary
from tests.ranks import finish, start_rank
from tests.test_delivery import (
    COLLECT_ARGS,
    assert_exactly_once,
    free_endpoint,
    step_counts,
    tensorboard_loss_steps,
    wait_for,
    wandb_segments,
)

# LazyFS crashed (a general protection fault in its libc calls) once with a second test
# worker beside it; alone it has not.
pytestmark = pytest.mark.serial
RECORDS = 8000  # per rank, at 500/s: 16 s, time for 3 cuts even when restarts are slow
SPILLED = 300  # rank 2's records, spilled while the collector is down
CUTS = 3
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
ARGS = ("--logger-type", "async,tensorboard,wandb", "--run-name", "cut", "--world-size", "3",
        "--journal-retention", "2MiB", *COLLECT_ARGS)  # fmt: skip


@pytest.fixture
def lazyfs(tmp_path: Path) -> Iterator[LazyFS]:
    """A LazyFS mount of the test's own, unmounted whatever happens."""
    fs = LazyFS(lazyfs_binary(), tmp_path / "lazyfs")
    try:
        fs.mount()
        yield fs
    finally:
        fs.close()


def journal_bytes(out: Path) -> int:
    return sum(segment.size() for segment in segments(journal_path(out)))


def mid_stream(out: Path, wanted: int, *, after_a_snapshot: bool) -> bool:
    """The journal holds more than ``wanted`` bytes (and a snapshot, if asked)."""
    return journal_bytes(out) > wanted and (
        not after_a_snapshot or bool(snapshots(journal_path(out)))
    )


def kill_tree(c: CollectorProcess) -> None:
    """kill -9 the collector and every process under it (backends, W&B's service): a
    power cut stops them all at once."""
    if c.proc.poll() is not None:
        return  # ended (and reaped): its pid may be another process's by now
    tree = process_tree(c.proc.pid)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    c.wait(10)

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_for(lambda: all(gone(pid) for pid in tree), 10)


def spill_rank(endpoint: str, out: Path) -> None:
    """Rank 2 logs while no collector runs, gives up after a second and spills into the
    output dir (fsynced), as a rank does at exit."""
    rank = start_rank(endpoint, 2, 3, SPILLED, "--close-timeout", "1", "--close-limit", "5",
                      "--spill-dir", str(spill_path(out)))  # fmt: skip
    (stats,) = finish([rank], timeout=60)
    assert stats["held"] > SPILLED and stats["dropped"] == 0, stats  # all held, spilled


def landed(out: Path) -> list[int]:
    """The lines in the JSONL file of ranks 0, 1 and 2."""
    paths = [out / f"training_params_and_metrics_global{rank}.jsonl" for rank in (0, 1, 2)]
    return [len(path.read_bytes().splitlines()) if path.exists() else 0 for path in paths]


def spill_sizes(out: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in spill_path(out).glob("*.spill")}


def checkpoints(out: Path) -> dict[str, int | str]:
    """Each backend's checkpointed journal offset, or what is wrong with its file."""
    found: dict[str, int | str] = {}
    for path in (out / ".ranklog").glob("backend-*.json"):
        try:
            found[path.name] = int(json.loads(path.read_text())["offset"])
        except ValueError as exc:
            found[path.name] = f"unreadable: {exc}"
    return found


class TestPowerCut:
    """Three power cuts mid-stream; afterwards every record is in every backend once."""

    def test_three_cuts_nothing_lost_nothing_doubled(
        self, lazyfs: LazyFS, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = lazyfs.mount_point / "out"
        endpoint = free_endpoint()

        def start(n: int) -> CollectorProcess:
            return collector(*ARGS, bind=endpoint, output_dir=out, env=ENV,
                             log_path=tmp_path / f"collector-{n}.log")  # fmt: skip

        c = start(0)
        ranks = [start_rank(endpoint, r, 3, RECORDS, "--rate", "500", "--close-timeout", "60",
                            "--metrics", "16")
                 for r in (0, 1)]  # fmt: skip
        try:
            for cut in range(1, CUTS + 1):
                # Mid-stream. The first cut comes before any snapshot (a restart reads the
                # whole journal), the later ones after one (it reads what follows only).
                wanted = journal_bytes(out) + (512 << 10)
                wait_for(functools.partial(mid_stream, out, wanted, after_a_snapshot=cut > 1), 30)
                assert all(rank.poll() is None for rank in ranks), "cut after the ranks ended"
                kill_tree(c)
                if cut == 2:
                    spill_rank(endpoint, out)
                saved = checkpoints(out), snapshots(journal_path(out)), spill_sizes(out)
                lazyfs.power_cut()
                # Checkpoints, the de-duplication snapshot and the spill file were fsynced:
                # all still there, whole.
                assert (checkpoints(out), snapshots(journal_path(out)), spill_sizes(out)) == saved
                c = start(cut)
            stats = finish(ranks)
            assert all(s["held"] == 0 and s["dropped"] == 0 for s in stats), stats
            # Then the checks below say what is missing or doubled, if anything is.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and landed(out) != [RECORDS, RECORDS, SPILLED]:
                time.sleep(0.1)
            c.terminate(signal.SIGTERM)
            assert c.wait(60) == 0, c.log()
        finally:
            for proc in ranks:
                proc.kill()
            kill_tree(c)  # before the fixture unmounts
        logs = "".join(path.read_text() for path in sorted(tmp_path.glob("collector-*.log")))
        # Each backend's files were durable before its checkpoint said so: none is rebuilt
        # from the journal's start (which retention may have deleted by then).
        rebuilt = [line for line in logs.splitlines() if "shorter than at its last" in line]
        assert not rebuilt, rebuilt
        assert_exactly_once(out, 2, RECORDS)
        assert landed(out)[2] == SPILLED, "the spilled rank's records did not all land"
        assert step_counts(out, 2) == Counter(range(SPILLED))  # the spilled rank, once
        assert sorted(tensorboard_loss_steps(out / "cut")) == list(range(RECORDS))
        runs = [run for run in wandb_segments(out) if run.run_id]
        assert len({run.run_id for run in runs}) == 1  # one run, resumed after each cut
        assert sorted(row["_step"] for run in runs for row in run.history) == list(range(RECORDS))

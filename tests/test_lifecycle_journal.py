"""The journal over a long life, on real processes and files: retention bounds the disk,
and a damaged entry costs that entry only (restarts: tests/test_restart_flat.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ranklog.collector.peers import Peer, RankTable
from ranklog.collector.settings import BackendSettings, parse_size
from ranklog.journal import DEFAULT_RETENTION, journal_path, read_entries, segments
from tests.conftest import CollectorProcess, ranklog, start_collector
from tests.ranks import finish, start_ranks
from tests.test_delivery import assert_exactly_once, kill_twice, step_counts

RANKS = 2
RECORDS = 100_000  # per rank: 200,000 records of 16 metrics
MiB = 1 << 20


def state_bytes(out: Path) -> int:
    return sum(path.stat().st_size for path in (out / ".ranklog").rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output directory that took 200,000 records under ``--journal-retention 8MiB``."""
    out = tmp_path_factory.mktemp("history") / "out"
    c = start_collector(
        out, "--world-size", str(RANKS), "--exit-when-done", "--journal-retention", "8MiB"
    )
    try:
        stats = finish(start_ranks(c.endpoint, RANKS, RECORDS, "--metrics", "16"), timeout=300)
        assert all(s["held"] == 0 and s["dropped"] == 0 for s in stats), stats
        assert c.wait(120) == 0, c.log()
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
    return out


class TestRetention:
    """`--journal-retention` bounds `.ranklog/`, and nothing is lost or doubled for it."""

    def test_state_stays_bounded_and_every_record_lands_once(self, history: Path) -> None:
        used = state_bytes(history)
        print(f".ranklog/ after 200,000 records: {used / MiB:.1f} MiB")
        assert used <= 32 * MiB
        assert segments(journal_path(history))[0].start > 32 * MiB  # history was deleted
        assert_exactly_once(history, RANKS, RECORDS)

    def test_replay_from_start_says_how_much_history_is_gone(self, history: Path) -> None:
        proc = ranklog("replay", "--output-dir", str(history), "--logger-type", "tensorboard",
                       "--run-name", "late", "--from-start")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        first = segments(journal_path(history))[0].start
        assert "were already deleted (--journal-retention); rebuilding from there" in proc.stderr
        assert f"before offset {first}" in proc.stderr, proc.stderr

    def test_kill_9_across_segments_and_snapshots(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        args = ("--world-size", "4", "--exit-when-done", "--journal-retention", "4MiB",
                "--silence-timeout", "5")  # fmt: skip
        c, stats = kill_twice(collector, args, out, 4000)
        assert all(s["held"] == 0 and s["dropped"] == 0 for s in stats), stats
        assert "already accepted" in c.log()
        assert len(segments(journal_path(out))) > 1
        assert_exactly_once(out, 4, 4000)


class TestDamage:
    """A flipped byte in the middle of a segment costs one record, reported by offset."""

    def test_replay_from_start_skips_the_damaged_entry(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        c = collector("--world-size", "2", "--exit-when-done", output_dir=out)
        finish(start_ranks(c.endpoint, 2, 3000))
        assert c.wait(30) == 0, c.log()
        (segment,) = segments(journal_path(out))
        flipped = segment.size() // 2
        start = next(s for s, end, _ in read_entries(journal_path(out), 0) if end > flipped)
        data = bytearray(segment.path.read_bytes())
        data[flipped] ^= 0x5A
        segment.path.write_bytes(bytes(data))
        for path in out.glob("training_params_and_metrics_global*.jsonl"):
            path.unlink()
        proc = ranklog("replay", "--output-dir", str(out), "--from-start")
        assert proc.returncode == 0, proc.stderr
        assert f"offset {start}" in proc.stderr, proc.stderr
        counts = [step_counts(out, rank) for rank in (0, 1)]
        assert all(n == 1 for count in counts for n in count.values())  # none doubled
        assert sum(len(count) for count in counts) >= 2 * 3000 - 1  # at most one lost


class TestRetentionFlag:
    """`--journal-retention` takes a size, and says so on anything else."""

    @pytest.mark.parametrize(
        ("text", "size"),
        [("8MiB", 8 * MiB), ("10GiB", 10 << 30), ("500MB", 500_000_000), ("4096", 4096)],
    )
    def test_sizes(self, text: str, size: int) -> None:
        assert parse_size(text) == size

    def test_default_is_one_gib(self) -> None:
        assert BackendSettings().retention_bytes == DEFAULT_RETENTION == 1 << 30

    def test_garbage_is_a_one_line_error(self, tmp_path: Path) -> None:
        proc = ranklog("collect", "--output-dir", str(tmp_path), "--journal-retention", "lots")
        assert proc.returncode == 2
        assert proc.stderr.strip() == (
            "ranklog collect: journal retention: expected a size such as 8MiB, 10GiB, 500MB "
            "or a number of bytes, got 'lots'"
        )


class TestSnapshot:
    """The de-duplication state round-trips through a snapshot."""

    def test_rank_table_round_trip(self) -> None:
        table = RankTable()
        peer = table.add(("run", 3, "inc"), Peer(rank=3, world_size=8, host="h", pid=7))
        for seq in (1, 2, 3, 5, 9):
            peer.tracker.accept(seq)
        peer.goodbye_seq, peer.dropped, peer.last_step = 9, 4, 120
        restored = RankTable.from_state(table.to_state(), now=5.0)
        (again,) = restored
        assert again.tracker.contiguous == 3
        assert [again.tracker.seen(seq) for seq in (4, 5, 9, 10)] == [False, True, True, False]
        assert (again.goodbye_seq, again.dropped, again.last_step, again.last_seen) == (
            9, 4, 120, 5.0,
        )  # fmt: skip
        assert not again.live

    def test_a_restored_incarnation_is_found_by_its_key(self) -> None:
        """After a restart from a snapshot, what a rank sends again is matched to its
        incarnation by (job, rank, incarnation): its accepted seqs are known."""
        table = RankTable()
        table.add(("job-a", 3, "inc-b"), Peer(rank=3, world_size=8, host="h", pid=7))
        table.add(("job-a", 4, "inc-c"), Peer(rank=4, world_size=8, host="h", pid=8))
        restored = RankTable.from_state(table.to_state(), now=5.0)
        again = restored.get(("job-a", 3, "inc-b"))
        assert again is not None and again.rank == 3 and again.job == "job-a"
        assert restored.get(("job-a", 4, "inc-c")) is not None

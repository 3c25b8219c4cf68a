"""Delivery guarantees on real processes: crashes, late collectors, dead ranks, full disks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from ranklog.collector.router import REFUSAL_REPORT_EVERY, AllowList
from tests.conftest import CollectorProcess, process_tree, ranklog, read_jsonl, start_collector
from tests.ranks import REPO, finish, start_ranks
from tests.wandb_reader import WandbRun, offline_runs, read_run

COLLECT_ARGS = ("--silence-timeout", "5", "--status-interval", "1")


@pytest.fixture(scope="module")
def early_collector(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[CollectorProcess, float]]:
    """TestEarlyCollector's collector and when it started: at the module's start."""
    out = tmp_path_factory.mktemp("early") / "out"
    c = start_collector(out, "--world-size", "2", "--exit-when-done", "--status-interval", "10")
    yield c, time.monotonic()
    if c.proc.poll() is None:
        c.proc.kill()
        c.proc.wait(10)


@pytest.fixture(scope="module", autouse=True)
def _start_early_collector_first(request: pytest.FixtureRequest) -> None:
    """Start ``early_collector`` before the module's first test, if its test is selected."""
    if any(item.cls is TestEarlyCollector for item in request.session.items):
        request.getfixturevalue("early_collector")


def free_endpoint() -> str:
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as probe:
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    return f"tcp://127.0.0.1:{port}"


def step_counts(output_dir: Path, rank: int) -> Counter[int]:
    path = output_dir / f"training_params_and_metrics_global{rank}.jsonl"
    return Counter(row["step"] for row in read_jsonl(path))  # type: ignore[misc]


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def tensorboard_loss_steps(run_dir: Path) -> list[int]:
    """The steps of every `loss` scalar in a TensorBoard run, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars("loss")]


def file_stats(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: its size and mtime (ns), by its path relative to it."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


def assert_exactly_once(output_dir: Path, world_size: int, records: int) -> None:
    for rank in range(world_size):
        counts = step_counts(output_dir, rank)
        missing = set(range(records)) - set(counts)
        doubled = {step: n for step, n in counts.items() if n > 1}
        assert not missing and not doubled, (
            f"rank {rank}: {len(missing)} missing (e.g. {sorted(missing)[:5]}), "
            f"{len(doubled)} doubled (e.g. {list(doubled.items())[:5]})"
        )


def kill_twice(
    collector: Callable[..., CollectorProcess], args: tuple[str, ...], out: Path, records: int
) -> tuple[CollectorProcess, list[dict[str, int]]]:
    """4 ranks log ``records`` each at 1,000/s while their collector is killed (-9) twice
    and restarted on the same address and output directory; returns the last collector
    (exited) and the ranks' final stats."""
    endpoint = free_endpoint()
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    c = collector(*args, bind=endpoint, output_dir=out, env=env)
    ranks = start_ranks(endpoint, 4, records, "--rate", "1000", "--close-timeout", "60")
    for pause in (1.2, 1.2):
        time.sleep(pause)
        c.terminate(signal.SIGKILL)
        c.wait(10)
        c = collector(*args, bind=endpoint, output_dir=out, env=env)
    stats = finish(ranks)
    assert c.wait(timeout=60) == 0, c.log()
    return c, stats


def wandb_segments(out: Path) -> list[WandbRun]:
    """Every offline W&B run segment under ``out`` that has a log (a collector killed while
    wandb was starting leaves a run folder without one)."""
    return [read_run(p) for p in offline_runs(out) if any(p.glob("run-*.wandb"))]


class TestCollectorCrash:
    """kill -9 of the collector, restarted on the same address and output directory."""

    def test_kill_twice_nothing_lost_nothing_doubled(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        args = (
            "--world-size",
            "4",
            "--exit-when-done",
            "--logger-type",
            "async,tensorboard,wandb",
            "--run-name",
            "crash",
            *COLLECT_ARGS,
        )
        c, stats = kill_twice(collector, args, out, 4000)
        assert all(s["held"] == 0 and s["dropped"] == 0 for s in stats), stats
        assert "already accepted" in c.log()  # the journal was read back
        assert_exactly_once(out, 4, 4000)
        tensorboard_steps = tensorboard_loss_steps(out / "crash")
        assert sorted(tensorboard_steps) == list(range(4000))  # rank 0's, each step once
        # A collector killed while wandb was starting may leave a log with no run record
        # yet: no rows in it either.
        segments = wandb_segments(out)
        assert not [run.history for run in segments if not run.run_id and run.history]
        segments = [run for run in segments if run.run_id]
        assert len({run.run_id for run in segments}) == 1  # one run, resumed after each crash
        wandb_steps = [row["_step"] for run in segments for row in run.history]
        assert sorted(wandb_steps) == list(range(4000))

    @pytest.mark.parametrize(
        ("backend", "policy"),
        [("tensorboard", "first"), ("tensorboard", "mean"), ("wandb", "mean")],
    )
    def test_cross_rank_policies_resume_exactly_once(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path, backend: str, policy: str
    ) -> None:
        """`first` remembers the steps it saw (else a second rank's value would pass as
        another "first"); `mean` takes back what it held. W&B writes asynchronously and
        can resume from before its last checkpoint: the policy goes back with it."""
        out = tmp_path / "out"
        args = ("--world-size", "4", "--exit-when-done", "--logger-type", backend,
                "--policy", f"{backend}={policy}", "--run-name", policy,
                *COLLECT_ARGS)  # fmt: skip
        kill_twice(collector, args, out, 3000)
        if backend == "wandb":
            rows = [row for run in wandb_segments(out) for row in run.history]
            steps = Counter(row["_step"] for row in rows if "loss" in row)
        else:
            steps = Counter(tensorboard_loss_steps(out / policy))
        doubled = {step: n for step, n in steps.items() if n > 1}
        assert not doubled, f"{len(doubled)} steps written twice, e.g. {list(doubled)[:5]}"
        assert sorted(steps) == list(range(3000))

    def test_file_shorter_than_its_checkpoint_is_rebuilt(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        """A machine crash can lose written bytes that a checkpoint already counted."""
        endpoint, out = free_endpoint(), tmp_path / "out"
        args = ("--world-size", "2", "--exit-when-done", *COLLECT_ARGS)
        c = collector(*args, bind=endpoint, output_dir=out)
        ranks = start_ranks(endpoint, 2, 3000, "--rate", "1000", "--close-timeout", "60")
        checkpoint = out / ".ranklog" / "backend-async.json"

        def checkpointed_sizes() -> dict[str, int]:
            return (
                json.loads(checkpoint.read_text())["backend"]["files"]
                if checkpoint.exists()
                else {}
            )

        wait_for(lambda: len([s for s in checkpointed_sizes().values() if s > 0]) == 2, 30)
        c.terminate(signal.SIGKILL)
        c.wait(10)
        sizes = checkpointed_sizes()
        shortened = next(iter(sizes))  # named relative to the output dir
        os.truncate(out / shortened, sizes[shortened] // 2)  # the tail the disk never got
        c = collector(*args, bind=endpoint, output_dir=out)
        finish(ranks)
        assert c.wait(timeout=60) == 0, c.log()
        assert_exactly_once(out, 2, 3000)
        assert "shorter than at its last checkpoint; rebuilding" in c.log()


class TestLateCollector:
    """Ranks that start before the collector lose nothing."""

    def test_collector_starts_five_seconds_late(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        endpoint, out = free_endpoint(), tmp_path / "out"
        ranks = start_ranks(endpoint, 2, 1000, "--rate", "400", "--close-timeout", "60")
        time.sleep(5)
        c = collector(
            "--world-size", "2", "--exit-when-done", *COLLECT_ARGS, bind=endpoint, output_dir=out
        )
        finish(ranks)
        assert c.wait(timeout=60) == 0, c.log()
        assert_exactly_once(out, 2, 1000)


class TestDeadRank:
    """kill -9 of one rank: reported silent, the others complete, the collector still exits."""

    def test_killed_rank_reported_and_collector_exits(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        c = collector(
            "--world-size", "3", "--exit-when-done", "--silence-timeout", "2", output_dir=out
        )
        ranks = start_ranks(c.endpoint, 3, 1500, "--rate", "500")
        wait_for(lambda: "rank 2 joined" in c.log(), 60)
        time.sleep(0.5)
        ranks[2].kill()
        finish(ranks[:2])
        started = time.monotonic()
        assert c.wait(timeout=60) == 0, c.log()
        assert time.monotonic() - started < 30
        assert "rank 2 (host" in c.log() and "silent" in c.log()
        events = [
            json.loads(line)
            for line in (out / ".ranklog" / "events.jsonl").read_text().splitlines()
        ]
        assert any(e["event"] == "rank_silent" and e["rank"] == 2 for e in events)
        assert sum(e["event"] == "rank_finished" for e in events) == 2
        assert_exactly_once(out, 2, 1500)
        assert 0 < sum(step_counts(out, 2).values()) < 1500


def replay(output_dir: Path, *args: str) -> None:
    """Run `ranklog replay` on ``output_dir``; it must succeed."""
    proc = ranklog("replay", "--output-dir", str(output_dir), *args)
    assert proc.returncode == 0, proc.stderr


class TestReplay:
    """`ranklog replay` rebuilds a backend from the journal."""

    def test_rebuild_deleted_jsonl(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        c = collector("--world-size", "2", "--exit-when-done", output_dir=out)
        finish(start_ranks(c.endpoint, 2, 300))
        assert c.wait(30) == 0
        original = (out / "training_params_and_metrics_global1.jsonl").read_text()
        for path in out.glob("*.jsonl"):
            if path.name.startswith("training"):
                path.unlink()
        replay(out, "--logger-type", "async", "--from-start")
        assert (out / "training_params_and_metrics_global1.jsonl").read_text() == original
        assert_exactly_once(out, 2, 300)

    def test_a_backend_added_later_keeps_what_its_files_already_hold(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        """Plain `ranklog replay` appends; only --from-start empties a backend's files."""
        out = tmp_path / "out"
        c = collector("--world-size", "2", "--exit-when-done", "--logger-type", "tensorboard",
                      output_dir=out)  # fmt: skip
        finish(start_ranks(c.endpoint, 2, 300))
        assert c.wait(30) == 0
        theirs = out / "training_params_and_metrics_global0.jsonl"
        theirs.write_text('{"written_by": "someone else"}\n')
        replay(out, "--logger-type", "async")
        rows = read_jsonl(theirs)
        assert rows[0] == {"written_by": "someone else"}
        assert [row["step"] for row in rows[1:]] == list(range(300))

    def test_a_copied_output_dir_replays_its_own_files_only(self, tmp_path: Path) -> None:
        """A collector started with a relative --output-dir; the dir is copied and the copy
        rebuilt (--from-start) from the same working dir: the original's files are not
        touched (its checkpoint once named them relative to the working dir)."""
        endpoint = f"ipc://{tmp_path}/c.ipc"
        collect = subprocess.Popen(
            [sys.executable, "-m", "ranklog", "collect", "--bind", endpoint, "--output-dir",
             "run", "--world-size", "2", "--exit-when-done", "--logger-type", "async"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        finish(start_ranks(endpoint, 2, 300))
        assert collect.wait(60) == 0
        shutil.copytree(tmp_path / "run", tmp_path / "copy")
        rebuilt = subprocess.run(
            [sys.executable, "-m", "ranklog", "replay", "--output-dir", "copy", "--from-start",
             "--logger-type", "async"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert "shorter than at its last checkpoint" not in rebuilt.stderr
        assert_exactly_once(tmp_path / "run", 2, 300)
        assert_exactly_once(tmp_path / "copy", 2, 300)

    def test_a_copied_then_moved_dir_is_its_own(self, tmp_path: Path) -> None:
        """`cp -a run copy`, a --from-start replay of the copy (JSONL and TensorBoard), then
        `mv run moved` and a replay of that: the original's files keep their sizes and
        mtimes, the old path is not made again, and each dir's JSONL and TensorBoard hold
        every step once."""
        endpoint = f"ipc://{tmp_path}/c.ipc"
        loggers = ("--logger-type", "async,tensorboard")
        collect = subprocess.Popen(
            [sys.executable, "-m", "ranklog", "collect", "--bind", endpoint, "--output-dir",
             "run", "--world-size", "2", "--exit-when-done", "--run-name", "tb", *loggers],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        finish(start_ranks(endpoint, 2, 300))
        assert collect.wait(60) == 0
        subprocess.run(["cp", "-a", "run", "copy"], cwd=tmp_path, check=True)
        before = file_stats(tmp_path / "run")

        def replay_here(output_dir: str) -> None:
            done = subprocess.run(
                [sys.executable, "-m", "ranklog", "replay", "--output-dir", output_dir,
                 "--from-start", *loggers],
                cwd=tmp_path, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr

        replay_here("copy")
        assert file_stats(tmp_path / "run") == before
        subprocess.run(["mv", "run", "moved"], cwd=tmp_path, check=True)
        replay_here("moved")
        assert not (tmp_path / "run").exists()
        for output_dir in (tmp_path / "copy", tmp_path / "moved"):
            assert_exactly_once(output_dir, 2, 300)
            assert tensorboard_loss_steps(output_dir / "tb") == list(range(300)), output_dir


class TestBackendProcessDies:
    """The backends run in a child process; if it dies, the journal still takes everything."""

    def test_collector_keeps_acknowledging_and_replay_writes_the_rest(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "out"
        c = collector("--world-size", "2", "--exit-when-done", output_dir=out)
        (backends,) = process_tree(c.proc.pid)[1:]
        os.kill(backends, signal.SIGKILL)
        stats = finish(start_ranks(c.endpoint, 2, 300))
        assert all(s["held"] == 0 and s["dropped"] == 0 for s in stats), stats
        assert c.wait(30) == 1
        assert "the backends' process exited" in c.log()
        replay(out)
        assert_exactly_once(out, 2, 300)


CURVE_RANK = """
import logging, sys
from ranklog import ZMQSocketHandler
server_key = sys.argv[2]
key_file = sys.argv[3] if len(sys.argv) > 3 else None
h = ZMQSocketHandler(sys.argv[1], rank=0, world_size=1, close_timeout=3,
                     curve_server_key=server_key, curve_key_file=key_file)
log = logging.getLogger("m"); log.addHandler(h); log.setLevel(logging.INFO)
for step in range(200):
    log.info({"loss": 1.0}, extra={"step": step})
h.close()
print(h.stats["held"])
"""


class TestCurve:
    """With CURVE, only clients holding an allowed key land anything."""

    def test_allowed_key_lands_everything_others_nothing(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        keys, allowed, other = tmp_path / "keys", tmp_path / "allowed", tmp_path / "other"
        for folder, name in ((keys, "collector"), (allowed, "rank"), (other, "intruder")):
            assert ranklog("keys", "--out", str(folder), "--name", name).returncode == 0
        c = collector(
            "--curve-secret",
            str(keys / "collector.key_secret"),
            "--curve-allow",
            str(allowed),
            output_dir=tmp_path / "out",
        )

        def rank(*args: str) -> str:
            proc = subprocess.run(
                [sys.executable, "-c", CURVE_RANK, c.endpoint, *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.strip()

        server_public = str(keys / "collector.key")
        assert rank(server_public, str(other / "intruder.key_secret")) == "201"  # not allowed
        assert rank(server_public) == "201"  # a fresh, unknown key pair
        plain = subprocess.run(  # no CURVE at all
            [
                sys.executable,
                "-m",
                "tests.rank_worker",
                "--endpoint",
                c.endpoint,
                "--rank",
                "0",
                "--world-size",
                "1",
                "--records",
                "50",
                "--close-timeout",
                "2",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plain.returncode == 0
        out = tmp_path / "out" / "training_params_and_metrics_global0.jsonl"
        assert not out.exists()
        assert rank(server_public, str(allowed / "rank.key_secret")) == "0"
        c.terminate()
        assert c.wait(30) == 0
        assert [row["step"] for row in read_jsonl(out)] == list(range(200))
        # Each refused key is named once (it retried for seconds); the plain client has none.
        intruder_key = (other / "intruder.key").read_text().split('public-key = "')[1][:40]
        refused = [line for line in c.log().splitlines() if "refused a client" in line]
        assert len(refused) == 2 and intruder_key in refused[0], refused
        events = read_jsonl(tmp_path / "out" / ".ranklog" / "events.jsonl")
        assert next(e["key"] for e in events if e["event"] == "client_refused") == intruder_key

    def test_a_refused_key_is_named_once_a_minute(self, tmp_path: Path) -> None:
        """An attacker retrying all day costs a line a minute, with the count since."""
        allowed, other = tmp_path / "allowed", tmp_path / "other"
        for folder, name in ((allowed, "rank"), (other, "intruder")):
            assert ranklog("keys", "--out", str(folder), "--name", name).returncode == 0
        clock = [1000.0]
        allow_list = AllowList(allowed, clock=lambda: clock[0])
        (rank_key,), (intruder_key,) = (
            list(zmq.auth.load_certificates(str(folder))) for folder in (allowed, other)
        )
        assert allow_list.callback("*", rank_key)
        for _ in range(100):  # ten a second for ten seconds
            assert not allow_list.callback("*", intruder_key)
            clock[0] += 0.1
        clock[0] += REFUSAL_REPORT_EVERY
        assert not allow_list.callback("*", intruder_key)
        events = allow_list.take_events()
        assert [(e, f["refused_since"]) for e, f in events] == [
            ("client_refused", 0),
            ("client_refused", 99),
        ]
        assert allow_list.take_events() == []


class TestFullDisk:
    """A full disk stops acknowledgements, not the collector; nothing is lost once space returns."""

    def test_no_loss_after_space_is_freed(
        self, collector: Callable[..., CollectorProcess], small_disk: Path
    ) -> None:
        out = small_disk / "out"
        filler = small_disk / "filler"
        c = collector(
            "--world-size",
            "2",
            "--exit-when-done",
            *COLLECT_ARGS,
            output_dir=out,
            log_path=small_disk.parent / "collector.log",
        )
        free = shutil.disk_usage(small_disk).free
        filler.write_bytes(b"\0" * (free - 300 * 1024))  # leave room for the first ~1,000 records
        ranks = start_ranks(c.endpoint, 2, 3000, "--rate", "1000", "--close-timeout", "90")
        deadline = time.monotonic() + 30
        while "cannot write" not in c.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "No space left on device" in c.log(), c.log()
        time.sleep(2)
        assert all(proc.poll() is None for proc in ranks)  # ranks hold their records
        filler.unlink()
        outputs = [proc.communicate(timeout=120) for proc in ranks]
        assert all(proc.returncode == 0 for proc in ranks), outputs
        assert all(json.loads(out.splitlines()[-1])["held"] == 0 for out, _ in outputs)
        for _, err in outputs:  # each rank said so on its terminal, then that it was over
            assert "cannot keep records now: its journal cannot be written" in err, err
            assert "keeps records again" in err, err
        assert c.wait(timeout=60) == 0, c.log()
        events = [
            json.loads(line)
            for line in (out / ".ranklog" / "events.jsonl").read_text().splitlines()
        ]
        assert any(e["event"] == "journal_blocked" for e in events)
        assert_exactly_once(out, 2, 3000)


SLOW_BACKENDS = '''
import logging
import threading
import time

from ranklog import AsyncStructuredHandler


class SlowJsonl(AsyncStructuredHandler):
    """JSONL on a slow disk."""

    def emit(self, record):
        time.sleep(0.0003)
        super().emit(record)


class Hung(logging.Handler):
    """Never returns, as a dead network call would."""

    def emit(self, record):
        threading.Event().wait()
'''


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def rss_kib(pid: int) -> int:
    """Resident memory of the collector and its backends' process."""
    total = 0
    for member in process_tree(pid):
        status = Path(f"/proc/{member}/status").read_text()
        total += int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1])
    return total


class TestBackpressure:
    """Slow or hung backends keep their backlog in the journal, not in memory."""

    def test_slow_backend_catches_up_and_memory_stays_bounded(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        (tmp_path / "slow_backends.py").write_text(SLOW_BACKENDS)
        out = tmp_path / "out"
        config = {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {
                "hung": {"()": "slow_backends.Hung"},
                "jsonl": {"()": "slow_backends.SlowJsonl", "log_dir": str(out)},
            },
            "root": {"level": "NOTSET", "handlers": ["hung", "jsonl"]},
        }  # fmt: skip
        (tmp_path / "logging.json").write_text(json.dumps(config))
        c = collector("--config", str(tmp_path / "logging.json"), "--drain-timeout", "2",
                      output_dir=out, env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
        # Warm-up (steps apart from the burst's): what the first records allocate for good
        # (decoders, buffers, the allocator's arenas) is not backlog.
        finish(start_ranks(c.endpoint, 4, 500, "--first-step", "100000"))
        rss_before = rss_kib(c.proc.pid)
        finish(start_ranks(c.endpoint, 4, 5_000))  # every record acknowledged: journaled
        rss_after = rss_kib(c.proc.pid)
        files = [out / f"training_params_and_metrics_global{rank}.jsonl" for rank in range(4)]
        written = sum(_lines(f) for f in files)
        print(f"collector RSS {rss_before} KiB -> {rss_after} KiB; {written} lines written")
        assert written < 22_000  # the slow backend is behind: its backlog is in the journal
        # Held in memory, the 20,000 records behind would take about 50 MiB.
        assert rss_after - rss_before < 24 * 1024, (rss_before, rss_after)
        # The slow backend catches up from the journal.
        wait_for(lambda: all(_lines(f) == 5_500 for f in files), 60)
        c.terminate()
        assert c.wait(60) == 1  # the hung backend is abandoned, by name
        assert "backend hung did not drain" in c.log()
        assert_exactly_once(out, 4, 5_000)


class TestEarlyCollector:
    """A standalone --exit-when-done collector waits for ranks still loading their model.

    Last in the module: its collector starts with the module's first test (see
    ``early_collector``), so the 75 s it must wait pass while the others run."""

    def test_collector_started_75_seconds_before_its_ranks(
        self, early_collector: tuple[CollectorProcess, float]
    ) -> None:
        c, started = early_collector
        waited_until = started + 75  # longer than the old 60 s give-up
        while time.monotonic() < waited_until:
            assert c.proc.poll() is None, c.log()
            time.sleep(1)
        assert c.proc.poll() is None, c.log()
        assert "waiting for rank(s) 0, 1 to connect" in c.log()
        finish(start_ranks(c.endpoint, 2, 500))
        assert c.wait(timeout=60) == 0, c.log()
        assert_exactly_once(c.output_dir, 2, 500)

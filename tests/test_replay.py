"""The backend runner's logic driven directly: a journal range, a backend, a clock.

No process, no thread, no sleep: :func:`ranklog.backends.feed.replay` steps the same code the
backends' process runs, and a fake clock moves the rank policies' deadlines. The cases that
need a real crash stay in ``tests/backend_harness.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from ranklog.backends.feed import Feed, Outcome, replay
from ranklog.backends.jsonl import AsyncStructuredHandler
from ranklog.backends.policies import make_policy
from ranklog.backends.protocol import DeclaresRanks, HasExitTeardown, Resumable, Rewindable
from ranklog.backends.route import Route, detach_handlers
from ranklog.backends.sink import Sink
from ranklog.journal import STATE_DIR, Journal, journal_path
from tests.backend_harness import envelope
from tests.conftest import read_jsonl


class FakeClock:
    """Monotonic seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def journal_of(out: Path, *frames: bytes) -> Journal:
    journal = Journal(journal_path(out))
    for frame in frames:
        journal.append(frame)
    journal.sync()
    return journal


def jsonl_feed(
    out: Path,
    clock: FakeClock,
    policy: str | None = None,
    *,
    filter_: Callable[..., bool] | None = None,
) -> Feed:
    """A JSONL backend (one file, ``all.jsonl``) on logger ``m``, as a config would attach it."""
    handler = AsyncStructuredHandler(log_dir=out, run_name="all")
    logger = logging.getLogger("m")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if filter_ is not None:
        logger.addFilter(filter_)
    logger.addHandler(handler)
    [(_, route)] = detach_handlers([logger])
    factory = partial(make_policy, policy, "jsonl", rename=False, timeout=60, world_size=2)
    return Feed(Sink(handler, route, name="jsonl"), policy=factory if policy else None, clock=clock)


class TestRouting:
    """Which records reach a backend, as the logger tree it was attached to says."""

    def test_a_failing_logger_filter_costs_one_record(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        journal = journal_of(
            tmp_path, envelope(0, 1, {"x": 1}), envelope(0, 2, {"y": 1}), envelope(0, 3, {"x": 3})
        )
        # A KeyError on the record without x.
        feed = jsonl_feed(tmp_path, FakeClock(), filter_=lambda record: record.msg["x"] > 0)
        replay(journal.path, feed, 0, journal.durable_end)
        assert feed.finish()
        assert "a logger filter failed" in caplog.text
        assert [row["x"] for row in read_jsonl(tmp_path / "all.jsonl")] == [1, 3]

    def test_a_detached_handler_gets_no_log_lines_of_this_process(self, tmp_path: Path) -> None:
        journal = journal_of(tmp_path, envelope(0, 1, {"x": 1}))
        feed = jsonl_feed(tmp_path, FakeClock())
        logging.getLogger("m").info({"x": 99})  # an SDK's own line, not a journaled record
        replay(journal.path, feed, 0, journal.durable_end)
        assert feed.finish()
        assert [row["x"] for row in read_jsonl(tmp_path / "all.jsonl")] == [1]


class TestReducingPolicyByTheClock:
    """mean waits for every rank of a step, up to its timeout by the injected clock."""

    def test_a_step_missing_a_rank_goes_out_partial_after_the_timeout(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        clock = FakeClock()
        journal = journal_of(tmp_path, envelope(0, 1, {"loss": 2.0}))
        feed = replay(journal.path, jsonl_feed(tmp_path, clock, "mean"), 0, journal.durable_end)
        assert not (tmp_path / "all.jsonl").exists()  # held, waiting for rank 1
        clock.now += 59
        feed.run_until(journal.durable_end)
        assert not (tmp_path / "all.jsonl").exists()
        clock.now += 1
        feed.run_until(journal.durable_end)
        rows = read_jsonl(tmp_path / "all.jsonl")
        assert [(row["step"], row["loss"], row["ranks_reported"]) for row in rows] == [(1, 2.0, 1)]
        assert "step 1 had 1 of 2 ranks after 60s" in caplog.text
        assert feed.finish()

    def test_a_complete_step_goes_out_without_waiting(self, tmp_path: Path) -> None:
        journal = journal_of(tmp_path, envelope(0, 1, {"loss": 1.0}), envelope(1, 1, {"loss": 3.0}))
        feed = replay(
            journal.path, jsonl_feed(tmp_path, FakeClock(), "mean"), 0, journal.durable_end
        )
        rows = read_jsonl(tmp_path / "all.jsonl")
        assert [(row["step"], row["loss"], row["ranks_reported"]) for row in rows] == [(1, 2.0, 2)]
        assert feed.finish()

    def test_a_rank_later_than_an_emitted_step_is_dropped(self, tmp_path: Path) -> None:
        clock = FakeClock()
        journal = journal_of(tmp_path, envelope(0, 1, {"loss": 1.0}), envelope(0, 2, {"loss": 5.0}))
        feed = replay(journal.path, jsonl_feed(tmp_path, clock, "mean"), 0, journal.durable_end)
        clock.now += 60  # both steps time out, in step order
        feed.run_until(journal.durable_end)
        journal.append(envelope(1, 1, {"loss": 3.0}))  # step 2 already went out
        journal.sync()
        feed.run_until(journal.durable_end)
        assert feed.policy is not None and feed.policy.late == 1
        assert feed.finish()
        rows = read_jsonl(tmp_path / "all.jsonl")
        assert [(row["step"], row["loss"]) for row in rows] == [(1, 1.0), (2, 5.0)]


class TestContracts:
    """The built-in backends implement what they claim (``ranklog.backends.protocol``)."""

    def test_declared_capabilities(self, tmp_path: Path) -> None:
        from ranklog import MLflowHandler, TensorBoardHandler, WandbHandler

        jsonl = AsyncStructuredHandler(log_dir=tmp_path)
        tensorboard = TensorBoardHandler(log_dir=tmp_path)
        wandb = WandbHandler(log_dir=tmp_path)
        mlflow = MLflowHandler(log_dir=tmp_path)
        assert isinstance(jsonl, Rewindable) and isinstance(tensorboard, Rewindable)
        assert isinstance(wandb, Resumable) and not isinstance(wandb, Rewindable)
        assert not isinstance(mlflow, Resumable)
        assert isinstance(wandb, HasExitTeardown) and not isinstance(jsonl, HasExitTeardown)
        for handler in (jsonl, tensorboard, wandb, mlflow):
            assert isinstance(handler, DeclaresRanks)
            handler.close()

    def test_unknown_arguments_are_refused_alike(self, tmp_path: Path) -> None:
        with pytest.raises(TypeError, match=r"unsupported argument.*buffer"):
            AsyncStructuredHandler(log_dir=tmp_path, buffer=3)
        handler = AsyncStructuredHandler(log_dir=tmp_path, file_name=tmp_path / "m.jsonl")
        handler.close()

    def test_tensorboard_rewinds_to_a_checkpoint(self, tmp_path: Path) -> None:
        from ranklog import TensorBoardHandler
        from tests.test_policy import rec
        from tests.test_tensorboard import accumulator

        handler = TensorBoardHandler(run_name="t", log_dir=tmp_path)
        handler.handle(rec(0, 0, {"loss": 0.0}))
        state = handler.checkpoint()
        handler.handle(rec(0, 1, {"loss": 1.0}))
        handler.flush()  # written past the checkpoint, then a write error: back to it
        handler.rewind_to(state)
        handler.handle(rec(0, 1, {"loss": 1.5}))
        handler.close()
        loss = accumulator(tmp_path / "t").Scalars("loss")
        assert [(event.step, event.value) for event in loss] == [(0, 0.0), (1, 1.5)]


class TestOutcomes:
    """A write error comes back from the handler as a value, and a step says what it did."""

    def test_a_write_error_in_emit_reaches_the_sink(self, tmp_path: Path) -> None:
        from tests.test_policy import rec

        class FullDisk(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    raise OSError(28, "No space left on device")
                except Exception:
                    self.handleError(record)  # the stdlib's way, unchanged

        sink = Sink(FullDisk(), Route([logging.getLogger("m")]), name="full")
        error = sink.deliver(rec(0, 1, {"x": 1}))
        assert isinstance(error, OSError) and error.errno == 28

    def test_a_write_error_rewinds_and_the_retry_writes_everything_once(
        self, tmp_path: Path
    ) -> None:
        class FailsOnce(AsyncStructuredHandler):
            lines = 0

            def _line(self, entry: dict[str, Any], step: Any, created: float) -> bytes:
                self.lines += 1
                if self.lines == 2:  # the second record, past the last checkpoint
                    raise OSError(28, "No space left on device")
                return super()._line(entry, step, created)

        journal = journal_of(tmp_path, envelope(0, 1, {"x": 1}), envelope(0, 2, {"x": 2}))
        clock = FakeClock()
        handler = FailsOnce(log_dir=tmp_path, run_name="all")
        feed = Feed(Sink(handler, Route([logging.getLogger("m")]), name="jsonl"), clock=clock)
        feed.resume(journal.path, tmp_path / STATE_DIR)
        assert feed.read_on(journal.durable_end) is Outcome.REWOUND
        assert feed.offset == 0  # back to the checkpoint: the first record is cut back
        clock.now += 1  # the retry
        feed.run_until(journal.durable_end)
        assert feed.finish()
        assert [row["x"] for row in read_jsonl(tmp_path / "all.jsonl")] == [1, 2]

    def test_a_file_opened_after_the_checkpoint_is_cut_back_after_a_crash(
        self, tmp_path: Path
    ) -> None:
        """The checkpoint lists a new file before anything is written to it: a crash after
        writing to it, before the next checkpoint, still cuts it back (no duplicate)."""

        def jsonl_backend() -> tuple[AsyncStructuredHandler, Feed]:
            handler = AsyncStructuredHandler(log_dir=tmp_path)  # a file per rank
            sink = Sink(handler, Route([logging.getLogger("m")]), name="jsonl")
            return handler, Feed(sink, clock=FakeClock())

        journal = journal_of(tmp_path, envelope(0, 1, {"x": 1}))
        handler, feed = jsonl_backend()
        feed.resume(journal.path, tmp_path / STATE_DIR)
        feed.read_on(journal.durable_end)  # and a checkpoint: rank 0's file
        journal.append(envelope(1, 1, {"x": 2}))  # rank 1: a new file
        journal.sync()
        feed.read_on(journal.durable_end)  # no checkpoint due by the clock
        handler.flush()  # on disk, past the last checkpoint; then the process dies
        handler, feed = jsonl_backend()
        feed.resume(journal.path, tmp_path / STATE_DIR)
        feed.run_until(journal.durable_end)
        assert feed.finish()
        rows = read_jsonl(tmp_path / "training_params_and_metrics_global1.jsonl")
        assert [row["x"] for row in rows] == [2]

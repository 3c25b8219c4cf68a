"""TensorBoardHandler: events read back with TensorBoard's own readers and HParams plugin."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import backend_context, plugin_data_pb2

from ranklog import TensorBoardHandler
from tests.conftest import CollectorProcess, read_jsonl, run_all_backends
from tests.ranks import REPO
from tests.test_policy import rec


def accumulator(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def hparams_dashboard(log_dir: Path) -> Any:
    """The experiment the HParams dashboard shows for ``log_dir`` (its plugin's own logic)."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(log_dir))
    mux.Reload()
    tb_context = base_plugin.TBContext(
        logdir=str(log_dir),
        multiplexer=mux,
        data_provider=data_provider.MultiplexerDataProvider(mux, str(log_dir)),
    )
    plugin = backend_context.Context(tb_context)
    request = context.RequestContext()
    metadata = plugin.hparams_metadata(request, "")
    return plugin.experiment_from_metadata(request, "", True, metadata, None)


SESSION_TAG = "_hparams_/session_start_info"


def hparams_written(acc: EventAccumulator) -> tuple[int, dict[str, Any]]:
    """How many hyper-parameter sets a run holds, and the first one's values, decoded from
    the HParams plugin's data."""
    content = acc.PluginTagToContent("hparams")[SESSION_TAG]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    values = {name: getattr(v, str(v.WhichOneof("kind"))) for name, v in info.hparams.items()}
    return len(acc.Tensors(SESSION_TAG)), values


@pytest.fixture
def handler(tmp_path: Path) -> Any:
    h = TensorBoardHandler(run_name="exp_rank{rank}", log_dir=tmp_path / "tb")
    yield h
    h.close()


class TestTensorBoardHandler:
    """In-process: InstructLab's layout and value rules, written without torch."""

    def test_numbers_become_scalars_and_other_strings_text(
        self, handler: TensorBoardHandler, caplog: pytest.LogCaptureFixture
    ) -> None:
        for step in range(3):
            handler.handle(
                rec(0, step, {"train": {"loss": step / 2}, "lr": "1e-4", "phase": "warmup"})
            )
        handler.handle(rec(0, 3, {"loss_list": [1, 2], "other": None}))
        handler.handle(rec(0, 4, {"loss_list": [3], "train": {"loss": 2.0}}))
        handler.flush()

        acc = accumulator(handler.log_dir / "exp_rank0")
        loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
        assert loss == [(0, 0.0), (1, 0.5), (2, 1.0), (4, 2.0)]
        assert [e.value for e in acc.Scalars("lr")] == pytest.approx([1e-4] * 3)  # "1e-4" parses
        phase = acc.Tensors("phase")
        assert [e.tensor_proto.string_val[0] for e in phase] == [b"warmup"] * 3
        assert acc.SummaryMetadata("phase").plugin_data.plugin_name == "text"
        assert "loss_list" not in acc.Tags()["scalars"] + acc.Tags()["tensors"]
        skipped = [r.getMessage() for r in caplog.records if "not a number or text" in r.msg]
        assert len(skipped) == 2  # once per key, however often it comes

    def test_hparams_reach_the_hparams_dashboard(self, handler: TensorBoardHandler) -> None:
        handler.handle(
            rec(
                0,
                None,
                {
                    "lr": 0.01,
                    "model": {"layers": 2},
                    "opt": "adam",
                    "betas": (0.9, 0.99),
                    "fused": True,
                },
                hparams=True,
            )
        )
        handler.handle(rec(0, 0, {"loss": 1.0}))
        handler.flush()

        experiment = hparams_dashboard(handler.log_dir)
        assert sorted(h.name for h in experiment.hparam_infos) == [
            "betas",
            "fused",
            "lr",
            "model/layers",
            "opt",
        ]
        assert [m.name.tag for m in experiment.metric_infos] == ["loss"]
        assert handler.run_dir is not None
        count, values = hparams_written(accumulator(handler.run_dir))
        assert count == 1
        assert values == {
            "lr": 0.01,
            "model/layers": 2.0,
            "opt": "adam",
            "betas": "(0.9, 0.99)",
            "fused": True,
        }

    def test_layout_is_log_dir_slash_run_name(self, tmp_path: Path) -> None:
        named = TensorBoardHandler(run_name="exp_rank{rank}", log_dir=tmp_path)
        default = TensorBoardHandler(log_dir=tmp_path)
        try:
            named.handle(rec(3, 0, {"x": 1}))
            default.handle(rec(0, 0, {"x": 1}))
        finally:
            named.close()
            default.close()
        dirs = sorted(p.name for p in tmp_path.iterdir())
        assert "exp_rank3" in dirs  # {rank} is the rank the record came from
        (default_dir,) = [d for d in dirs if d != "exp_rank3"]
        assert default_dir.endswith("_rank0")  # InstructLab's "{time}_rank{rank}"
        assert list((tmp_path / "exp_rank3").glob("events.out.tfevents.*"))

    def test_events_are_flushed_on_a_timer(self, tmp_path: Path) -> None:
        handler = TensorBoardHandler(run_name="t", log_dir=tmp_path, flush_secs=0.2)
        try:
            handler.handle(rec(0, 0, {"loss": 0.25}))
            handler.handle(rec(0, 1, {"loss": 0.5}))
            deadline = time.monotonic() + 5
            steps: list[int] = []
            while time.monotonic() < deadline and len(steps) < 2:
                acc = accumulator(tmp_path / "t")
                steps = [e.step for e in acc.Scalars("loss")] if acc.Tags()["scalars"] else []
                time.sleep(0.05)
            assert steps == [0, 1]  # readable before any flush() or close()
        finally:
            handler.close()

    def test_unknown_argument_is_a_clear_error(self, tmp_path: Path) -> None:
        with pytest.raises(TypeError, match=r"unsupported argument.*purge_step"):
            TensorBoardHandler(log_dir=tmp_path, purge_step=3)


class TestTensorBoardInTheCollector:
    """2 ranks x 300 steps -> ``ranklog collect --logger-type async,tensorboard,wandb``."""

    def test_rank0_series_once_per_step_with_hparams(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        c = run_all_backends(collector, 300, "--hparams", env=env)

        mux = EventMultiplexer()
        mux.AddRunsFromDirectory(str(c.output_dir))
        mux.Reload()
        assert list(mux.Runs()) == ["demo"]  # one run: rank 0's, at output_dir/run_name
        loss = mux.Scalars("demo", "loss")
        assert [e.step for e in loss] == list(range(300))  # every step exactly once
        # tests/rank_worker.py logs 1/(step+1) + rank: these are rank 0's values
        assert [e.value for e in loss] == pytest.approx([1 / (s + 1) for s in range(300)])
        assert [e.step for e in mux.Scalars("demo", "train/tokens")] == list(range(300))

        acc = accumulator(c.output_dir / "demo")
        count, values = hparams_written(acc)
        assert count == 1  # both ranks sent them; TensorBoard has them once
        assert values == {"lr": 0.01, "model/layers": 2.0}
        assert {h.name for h in hparams_dashboard(c.output_dir).hparam_infos} == {
            "lr",
            "model/layers",
        }
        for rank in (0, 1):  # JSONL still holds every rank
            rows = read_jsonl(c.output_dir / f"training_params_and_metrics_global{rank}.jsonl")
            assert [r["step"] for r in rows if "step" in r] == list(range(300))


FILL_THEN_WRITE = """
import contextlib, os, sys, time
from pathlib import Path
from ranklog import TensorBoardHandler
from ranklog.backends.sink import reraise_os_errors
from tests.test_policy import rec

disk = Path(sys.argv[1])
handler = TensorBoardHandler(run_name="full", log_dir=disk, flush_secs=0.01)
reraise_os_errors(handler)  # as in the collector, whose feed reports it in one line
handler.handle(rec(0, 0, {"loss": 0.0}))
fill = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
with contextlib.suppress(OSError):  # until the disk is full
    while os.write(fill, bytes(4096)):
        pass
os.close(fill)
deadline, step = time.monotonic() + 30, 1
while time.monotonic() < deadline:
    try:
        handler.handle(rec(0, step, {"loss": float(step), "text": "x" * 512}))
        handler.flush()
    except OSError as exc:
        print("caller got errno", exc.errno)
        break
    step += 1
    time.sleep(0.005)  # the writer thread's turn
(disk / "filler").unlink()
with contextlib.suppress(OSError):
    handler.close()
"""


class TestTensorBoardFullDisk:
    """A full disk: the write error reaches the caller; no thread traceback is printed."""

    def test_write_error_reaches_the_caller_without_a_thread_traceback(
        self, small_disk: Path
    ) -> None:
        done = subprocess.run(
            [sys.executable, "-c", FILL_THEN_WRITE, str(small_disk)],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "caller got errno 28" in done.stdout, done.stdout  # ENOSPC
        assert "Traceback" not in done.stderr and "Exception in thread" not in done.stderr

"""Values arrive as logged: NaN and infinities through JSONL, TensorBoard and W&B, and each
W&B row at the time its rank logged it."""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from ranklog import AsyncStructuredHandler, WandbHandler
from ranklog.backends.jsonl import _json_encoder
from tests.conftest import CollectorProcess, read_jsonl
from tests.ranks import finish, start_rank
from tests.test_jobs import wandb_env
from tests.test_policy import rec
from tests.wandb_reader import offline_runs, read_run

SPECIAL = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf}


def same(value: object, expected: float) -> bool:
    return isinstance(value, float) and (
        math.isnan(value) if math.isnan(expected) else value == expected
    )


class TestJsonlLines:
    """The JSONL encoder: orjson's line unless a value is NaN or infinite."""

    def test_non_finite_values_are_written_as_json_writes_them(self) -> None:
        encode = _json_encoder()
        line = encode({"loss": math.nan, "up": [1.0, math.inf], "down": -math.inf, "n": None})
        assert line == b'{"loss":NaN,"up":[1.0,Infinity],"down":-Infinity,"n":null}\n'
        back = json.loads(line)
        assert math.isnan(back["loss"]) and back["up"][1] == math.inf and back["n"] is None

    def test_other_lines_stay_orjsons(self) -> None:
        orjson = pytest.importorskip("orjson")
        entry = {"loss": 0.5, "none": None, "text": "null", "é": 1}
        assert _json_encoder()(entry) == orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)

    def test_numpy_values(self) -> None:
        np = pytest.importorskip("numpy")
        line = _json_encoder()({"a": np.float32("nan"), "b": np.array([1.0, -np.inf])})
        assert line == b'{"a":NaN,"b":[1.0,-Infinity]}\n'

    def test_in_process_handler(self, tmp_path: Path) -> None:
        handler = AsyncStructuredHandler(log_dir=tmp_path, file_name=tmp_path / "m.jsonl")
        handler.handle(rec(0, 1, dict(SPECIAL)))
        handler.close()
        (row,) = read_jsonl(tmp_path / "m.jsonl")
        assert all(same(row[key], value) for key, value in SPECIAL.items())


class TestWandbTimestamps:
    """A W&B row's ``_timestamp`` is its record's ``created``, not the collector's clock."""

    def test_rows_carry_the_ranks_time(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for key, value in wandb_env(tmp_path).items():
            monkeypatch.setenv(key, value)
        handler = WandbHandler(log_dir=tmp_path)
        an_hour_ago = time.time() - 3600
        for step in range(3):
            handler.handle(rec(0, step, {"loss": 1.0}, created=an_hour_ago + step * 10.25))
        handler.handle(rec(0, 3, {"loss": 1.0, "_timestamp": 12.5}))  # the user's own wins
        handler.close()
        (path,) = offline_runs(tmp_path)
        stamps = [row["_timestamp"] for row in read_run(path).history]
        expected = [an_hour_ago + step * 10.25 for step in range(3)] + [12.5]
        assert stamps == pytest.approx(expected, abs=1e-3)


class TestThroughTheCollector:
    """A real rank logs NaN, inf and -inf at 20 steps/s to a real collector."""

    def test_special_values_and_times_reach_every_backend(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        c = collector("--logger-type", "async,tensorboard,wandb", "--run-name", "values",
                      env=wandb_env(tmp_path))  # fmt: skip
        finish([start_rank(c.endpoint, 0, 1, 10, "--special-values", "--rate", "20")])
        c.terminate(signal.SIGTERM)
        assert c.wait(60) == 0, c.log()
        out = c.output_dir

        rows = read_jsonl(out / "training_params_and_metrics_global0.jsonl")
        assert len(rows) == 10
        for row in rows:
            assert all(same(row[key], value) for key, value in SPECIAL.items()), row

        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(out / "values"), size_guidance={"scalars": 0})
        accumulator.Reload()
        for key, value in SPECIAL.items():
            events = accumulator.Scalars(key)
            assert len(events) == 10 and all(same(e.value, value) for e in events), key

        (path,) = offline_runs(out)
        history = read_run(path).history
        assert [row["_step"] for row in history] == list(range(10))
        for row in history:
            assert all(same(row[key], value) for key, value in SPECIAL.items()), row
        # Each row at the rank's time (the JSONL line's timestamp), spread over ~0.5 s.
        logged = [datetime.fromisoformat(str(row["timestamp"])).timestamp() for row in rows]
        stamps = [row["_timestamp"] for row in history]
        assert stamps == pytest.approx(logged, abs=1e-3)
        assert stamps[-1] - stamps[0] > 0.4

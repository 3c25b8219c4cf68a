"""AsyncStructuredHandler: InstructLab's JSONL layout, in process and per source rank."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from ranklog import AsyncStructuredHandler, IsMappingFilter
from tests.conftest import read_jsonl


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger("test.jsonl")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class TestLayout:
    """File names, flattened keys, step and timestamp."""

    def test_default_file_name_uses_rank_env(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("RANK", "2")
        handler = AsyncStructuredHandler(log_dir=tmp_path)
        logger = _logger(handler)
        logger.info({"train": {"loss": 0.5}, "lr": 0.1}, extra={"step": 0})
        logger.info({"train": {"loss": 0.4}}, extra={"step": 1})
        logger.info({"note": "no step"})
        handler.close()
        rows = read_jsonl(tmp_path / "training_params_and_metrics_global2.jsonl")
        assert rows[0]["train/loss"] == 0.5 and rows[0]["lr"] == 0.1
        assert [row.get("step") for row in rows] == [0, 1, None]  # step 0 is written
        assert all("timestamp" in row for row in rows)

    def test_run_name_placeholders(self, tmp_path: Path) -> None:
        handler = AsyncStructuredHandler(log_dir=tmp_path, run_name="exp_r{rank}_l{local_rank}")
        record = logging.LogRecord("m", logging.INFO, "f", 1, {"x": 1}, None, None)
        record.rank, record.local_rank = 5, 1
        handler.handle(record)
        handler.close()
        assert read_jsonl(tmp_path / "exp_r5_l1.jsonl")[0]["x"] == 1

    def test_one_file_per_source_rank(self, tmp_path: Path) -> None:
        handler = AsyncStructuredHandler(log_dir=tmp_path)
        for rank in (0, 1, 0, 3):
            record = logging.LogRecord("m", logging.INFO, "f", 1, {"rank_was": rank}, None, None)
            record.rank = rank
            handler.handle(record)
        assert len(handler._files) == 3
        handler.close()
        assert [
            r["rank_was"]
            for r in read_jsonl(tmp_path / "training_params_and_metrics_global0.jsonl")
        ] == [0, 0]
        assert (tmp_path / "training_params_and_metrics_global3.jsonl").exists()

    def test_file_name_kwarg(self, tmp_path: Path) -> None:
        handler = AsyncStructuredHandler(log_dir=tmp_path, file_name=tmp_path / "x" / "m.jsonl")
        _logger(handler).info({"a": 1})
        handler.close()
        assert read_jsonl(tmp_path / "x" / "m.jsonl") == [
            {"a": 1, "timestamp": read_jsonl(tmp_path / "x" / "m.jsonl")[0]["timestamp"]}
        ]

    def test_non_mapping_is_skipped_with_warning(self, tmp_path: Path) -> None:
        handler = AsyncStructuredHandler(log_dir=tmp_path)
        with pytest.warns(UserWarning, match="expected a mapping"):
            _logger(handler).info("text")
        handler.addFilter(IsMappingFilter())
        _logger(handler).info("text again")  # filtered quietly
        handler.close()
        assert not list(tmp_path.glob("*.jsonl"))


class TestBuffering:
    """Writes are buffered, flushed on a timer and on close."""

    def test_timer_flush(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RANK", "0")
        handler = AsyncStructuredHandler(log_dir=tmp_path, flush_interval=0.1)
        _logger(handler).info({"loss": 1.0}, extra={"step": 3})
        path = tmp_path / "training_params_and_metrics_global0.jsonl"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not path.read_bytes():
            time.sleep(0.05)
        assert read_jsonl(path)[0]["step"] == 3
        handler.close()

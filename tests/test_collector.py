"""The library object ``ranklog.Collector``: it runs on the settings it is given, whole."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ranklog import Collector, ZMQSocketHandler
from ranklog.collector.settings import BackendSettings, ServeSettings
from tests.conftest import read_jsonl


class TestCollectorSettings:
    """Keywords name any setting (its default otherwise); a misspelled one is an error; a
    whole ServeSettings is taken as it is."""

    def test_keywords_reach_the_settings(self, tmp_path: Path) -> None:
        collector = Collector(
            f"ipc://{tmp_path}/c.ipc", output_dir=tmp_path, stall_timeout=7.0, metrics_port=None
        )
        assert collector.settings.stall_timeout == 7.0
        assert collector.settings.backends.output_dir == tmp_path
        assert collector.settings.job_stall_timeout == ServeSettings.job_stall_timeout

    def test_an_unknown_keyword_is_refused(self) -> None:
        with pytest.raises(TypeError, match="outptu_dir"):
            Collector(outptu_dir="logs")

    def test_whole_settings(self, tmp_path: Path) -> None:
        settings = ServeSettings(BackendSettings(output_dir=tmp_path), bind="ipc://x")
        assert Collector(settings).settings is settings

    def test_it_runs_on_them(self, tmp_path: Path) -> None:
        endpoint = f"ipc://{tmp_path}/c.ipc"
        with Collector(endpoint, output_dir=tmp_path / "out", world_size=1) as collector:
            handler = ZMQSocketHandler(endpoint, rank=0, local_rank=0, world_size=1)
            logger = logging.getLogger("test_collector")
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.info({"loss": 0.5}, extra={"step": 1})
            handler.close()
            logger.removeHandler(handler)
        assert collector.exit_code == 0
        (path,) = (tmp_path / "out").glob("*.jsonl")  # drained: stop() returned
        assert [row["loss"] for row in read_jsonl(path)] == [0.5]

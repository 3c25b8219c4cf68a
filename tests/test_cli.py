"""`ranklog collect` flags, errors and configuration files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.conftest import CollectorProcess, ranklog
from tests.ranks import run_ranks


class TestErrors:
    """Misconfiguration fails fast with a message that says what to do."""

    def test_unknown_logger_type(self, tmp_path: Path) -> None:
        proc = ranklog("collect", "--output-dir", str(tmp_path), "--logger-type", "async,bogus")
        assert proc.returncode == 2
        assert "unknown logger type(s) bogus" in proc.stderr

    def test_remote_bind_needs_flag(self, tmp_path: Path) -> None:
        proc = ranklog("collect", "--bind", "tcp://0.0.0.0:5999", "--output-dir", str(tmp_path))
        assert proc.returncode == 2 and "--allow-remote" in proc.stderr

    def test_exit_when_done_needs_world_size(self, tmp_path: Path) -> None:
        proc = ranklog("collect", "--output-dir", str(tmp_path), "--exit-when-done")
        assert proc.returncode == 2 and "world_size" in proc.stderr

    def test_help_lists_flags(self) -> None:
        out = ranklog("collect", "--help").stdout
        for flag in ("--bind", "--logger-type", "--run-name", "--output-dir", "--config"):
            assert flag in out


class TestSeedFlagAliases:
    """--logger_type, --run_name and --output_dir work like the seed's training flags."""

    def test_underscore_aliases(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        out = tmp_path / "alias"
        c = collector(
            "--logger_type",
            "async",
            "--run_name",
            "r",
            "--world-size",
            "1",
            "--exit-when-done",
            output_dir=out,
        )
        run_ranks(c.endpoint, 1, 10)
        assert c.wait(30) == 0
        assert (
            len((out / "training_params_and_metrics_global0.jsonl").read_text().splitlines()) == 10
        )


class TestConfigFile:
    """--config runs any stdlib handler from a dictConfig file."""

    def test_json_dict_config(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        lines = tmp_path / "plain.log"
        config = {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(rank)s %(step)s %(message)s"}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "filename": str(lines),
                    "formatter": "plain",
                }
            },
            "loggers": {"instructlab.training.metrics": {"handlers": ["file"], "level": "INFO"}},
        }
        path = tmp_path / "logging.json"
        path.write_text(json.dumps(config))
        c = collector("--config", str(path), "--world-size", "2", "--exit-when-done")
        run_ranks(c.endpoint, 2, 5)
        assert c.wait(30) == 0, c.log()
        text = lines.read_text().splitlines()
        assert len(text) == 10
        assert any(line.startswith("1 4 {") for line in text)

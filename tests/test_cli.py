"""`ranklog collect` flags, errors and configuration files."""

from __future__ import annotations

import json
import re
import socket
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


class TestOneLineErrors:
    """Every CLI error is one line naming the file or path, no traceback: exit 2 for usage
    or configuration, 1 at run time."""

    def _one_line(self, proc: object, code: int, *fragments: str) -> None:
        assert proc.returncode == code, proc.stderr  # type: ignore[attr-defined]
        lines = proc.stderr.strip().splitlines()  # type: ignore[attr-defined]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr  # type: ignore[attr-defined]
        for fragment in fragments:
            assert fragment in lines[0]

    def test_missing_config_file(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope.yaml"
        proc = ranklog("collect", "--output-dir", str(tmp_path), "--config", str(missing))
        self._one_line(proc, 2, "cannot read the config file", str(missing), "No such file")

    def test_config_is_a_directory(self, tmp_path: Path) -> None:
        proc = ranklog("collect", "--output-dir", str(tmp_path), "--config", str(tmp_path))
        self._one_line(proc, 2, str(tmp_path), "Is a directory")

    def test_broken_yaml(self, tmp_path: Path) -> None:
        broken = tmp_path / "broken.yaml"
        broken.write_text("version: 1\n  x: [\n")
        proc = ranklog("collect", "--output-dir", str(tmp_path), "--config", str(broken),
                       "--bind", "tcp://127.0.0.1:*")  # fmt: skip
        self._one_line(proc, 2, f"{broken} is not valid YAML")

    def test_handler_error_shows_its_cause(self, tmp_path: Path) -> None:
        config = tmp_path / "h.yaml"
        config.write_text(
            "version: 1\nhandlers:\n  h:\n    class: logging.FileHandler\n"
            f"    filename: {tmp_path}/no/such/dir/x.log\nroot:\n  handlers: [h]\n"
        )
        proc = ranklog("collect", "--output-dir", str(tmp_path / "out"), "--config",
                       str(config), "--bind", "tcp://127.0.0.1:*")  # fmt: skip
        self._one_line(proc, 2, "Unable to configure handler 'h'", "FileNotFoundError")

    def test_unwritable_output_dir(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("")
        proc = ranklog("collect", "--output-dir", str(blocker / "out"))
        self._one_line(proc, 2, "cannot write to the output dir", str(blocker / "out"))

    def test_replay_while_a_collector_serves_the_dir(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        """Two writers of the same backend files would write records twice."""
        out = tmp_path / "out"
        c = collector(output_dir=out)
        proc = ranklog("replay", "--output-dir", str(out))
        self._one_line(proc, 2, f"pid {c.proc.pid}", str(out), "after it stops")
        c.terminate()
        assert c.wait(30) == 0
        assert ranklog("replay", "--output-dir", str(out)).returncode == 0

    def test_unknown_run_name_placeholder(self, tmp_path: Path) -> None:
        proc = ranklog("collect", "--output-dir", str(tmp_path), "--run-name", "{tme}")
        self._one_line(proc, 2, "run name '{tme}': unknown placeholder")

    def test_replay_of_a_dir_no_collector_wrote(self, tmp_path: Path) -> None:
        typo = tmp_path / "ouput"
        proc = ranklog("replay", "--output-dir", str(typo))
        self._one_line(proc, 2, "nothing to replay", str(typo), "does not exist")
        assert not typo.exists()
        proc = ranklog("replay", "--output-dir", str(tmp_path))
        self._one_line(proc, 2, "nothing to replay", f"{tmp_path} holds no .ranklog/")

    def test_version_and_defaults_in_help(self) -> None:
        assert ranklog("--version").stdout.startswith("ranklog ")
        out = " ".join(ranklog("collect", "--help").stdout.split())  # however it wraps
        assert "before a rank counts as gone (default: 60.0)" in out
        assert "where backends write (default: logs)" in out

    def test_startup_failure_is_the_one_line(self, tmp_path: Path) -> None:
        """A port in use: its reason is what a user reads, not closing lines of a
        collector that never served."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            proc = ranklog("collect", "--output-dir", str(tmp_path), "--bind",
                           f"tcp://127.0.0.1:{port}")  # fmt: skip
            self._one_line(proc, 2, f"cannot listen on tcp://127.0.0.1:{port}", "in use")
            proc = ranklog("collect", "--output-dir", str(tmp_path), "--bind",
                           "tcp://127.0.0.1:*", "--metrics-port", str(port))  # fmt: skip
            self._one_line(proc, 2, f"cannot serve /metrics on 127.0.0.1:{port}", "in use")


class TestFlagSpelling:
    """A flag is spelled out: no prefix of it is taken for it."""

    def test_abbreviations_are_errors(self, tmp_path: Path) -> None:
        for flag, value in (("--logger-typ", "async"), ("--world-siz", "2")):
            proc = ranklog("collect", "--output-dir", str(tmp_path), flag, value)
            assert proc.returncode == 2, proc.stderr
            assert f"unrecognized arguments: {flag}" in proc.stderr, proc.stderr
        proc = ranklog("top", "--once", "--jso", "--output-dir", str(tmp_path))
        assert proc.returncode == 2 and "unrecognized arguments: --jso" in proc.stderr

    def test_each_default_shown_once(self) -> None:
        for command in ("collect", "replay", "top", "keys"):
            out = " ".join(ranklog(command, "--help").stdout.split())  # however it wraps
            entries = re.split(r" (?=-{1,2}[a-z][\w-]* [A-Z_]+ |-{1,2}[a-z][\w-]* [a-z(])", out)
            for entry in entries:
                assert entry.count("(default") <= 1, entry
            assert "(default: None)" not in out and "(default: False)" not in out, out
        out = " ".join(ranklog("collect", "--help").stdout.split())
        assert "(default: $RANKLOG_STALL_TIMEOUT or 300)" in out


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


class TestHousekeeping:
    """What a collector leaves behind: its output, not its socket file."""

    def test_ipc_socket_file_is_removed_at_exit(
        self, collector: Callable[..., CollectorProcess], tmp_path: Path
    ) -> None:
        socket_file = tmp_path / "c.ipc"
        c = collector("--world-size", "1", "--exit-when-done", bind=f"ipc://{socket_file}")
        assert socket_file.exists()
        run_ranks(c.endpoint, 1, 10)
        assert c.wait(30) == 0, c.log()
        assert not socket_file.exists()

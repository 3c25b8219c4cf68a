"""The ``ranklog`` command line's flags: one parser for ``collect``, ``replay``, ``keys`` and
``top``, each flag's default taken from the settings' field of the same name."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ranklog.collector.settings import (
    JOB_STALL_TIMEOUT_ENV,
    METRICS_PORT_ENV,
    STALL_TIMEOUT_ENV,
    BackendSettings,
    ServeSettings,
)
from ranklog.collector.top import add_top_command
from ranklog.endpoints import ENDPOINT_ENV
from ranklog.names import BACKEND_OPTIONS


def _backend_flags() -> argparse.ArgumentParser:
    """Flags that say what the backends are: shared by ``collect`` and ``replay``."""
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flags.add_argument(
        "--output-dir",
        "--output_dir",
        default=BackendSettings.output_dir,
        help="where backends write",
    )
    flags.add_argument(
        "--logger-type",
        "--logger_type",
        dest="logger_types",
        metavar="LOGGER_TYPE",
        default=BackendSettings.logger_types,
        help="comma-separated backends: async (JSONL), tensorboard, wandb, mlflow",
    )
    flags.add_argument(
        "--run-name",
        "--run_name",
        default=None,
        help="run name; placeholders {time}, {utc_time}, {rank}, {local_rank}",
    )
    flags.add_argument(
        "--config",
        default=None,
        help="logging dictConfig (YAML or JSON) to run instead of --logger-type",
    )
    flags.add_argument(
        "--policy",
        default=None,
        help="rank policy per backend, e.g. tensorboard=mean,wandb=rank0; one of rank0 "
        "(default for tensorboard, wandb, mlflow), first, all, mean, min, max, sum",
    )
    flags.add_argument(
        "--policy-timeout",
        type=float,
        default=BackendSettings.policy_timeout,
        help="seconds a mean/min/max/sum step waits for missing ranks before it is emitted "
        "as partial",
    )
    flags.add_argument("--world-size", type=int, default=None, help="ranks to expect")
    flags.add_argument(
        "--drain-timeout",
        type=float,
        default=BackendSettings.drain_timeout,
        help="seconds backends get to drain on shutdown; one still busy then is abandoned "
        "(what it missed stays in the journal: `ranklog replay` writes it later)",
    )
    flags.add_argument(
        "--journal-retention",
        default=BackendSettings.journal_retention,
        metavar="SIZE",
        help="journal to keep once every backend has read it (8MiB, 10GiB, 500MB, bytes): "
        "what `ranklog replay --from-start` and a backend added later can still read; the "
        "oldest segments beyond it are deleted",
    )
    _add_backend_options(flags)
    flags.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return flags


def _add_backend_options(flags: argparse.ArgumentParser) -> None:
    """InstructLab's per-backend settings (``--wandb-project``, ...), as setup takes them."""
    for option, (backend, argument) in BACKEND_OPTIONS.items():
        flags.add_argument(
            f"--{option.replace('_', '-')}",
            dest=option,
            default=None,
            help=f"{backend}'s {argument.replace('_', ' ')} (setup_metric_logger's {option})",
        )


def _add_serve_flags(collect: argparse.ArgumentParser) -> None:
    """Flags of ``collect`` alone: the socket, liveness and the exit rule."""
    collect.add_argument(
        "--bind",
        default=os.environ.get(ENDPOINT_ENV, ServeSettings.bind),
        help=f"ZeroMQ endpoint to listen on (default: ${ENDPOINT_ENV} or {ServeSettings.bind}); "
        "tcp://127.0.0.1:* picks a free port",
    )
    collect.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once every rank said goodbye or went silent",
    )
    collect.add_argument(
        "--connect-timeout",
        type=float,
        default=ServeSettings.connect_timeout,
        help="with --exit-when-done: seconds to wait for a rank that never connected "
        "(default: as long as it takes; a job may load its model for a long time)",
    )
    collect.add_argument(
        "--parent-pid",
        type=int,
        default=ServeSettings.parent_pid,
        help="with --exit-when-done: the process that started this collector for its job (the "
        "embedded default passes rank 0's); once it has exited, ranks never heard count as "
        "gone and a rank silent for 10s does too",
    )
    # The embedded collector's: rank 0's stderr, where its warnings go too (ranklog.reporting).
    collect.add_argument("--alert-fd", type=int, default=None, help=argparse.SUPPRESS)
    collect.add_argument(
        "--silence-timeout",
        type=float,
        default=ServeSettings.silence_timeout,
        help="seconds without a heartbeat before a rank counts as gone",
    )
    collect.add_argument(
        "--status-interval",
        type=float,
        default=ServeSettings.status_interval,
        help="seconds between status lines",
    )
    collect.add_argument(
        "--allow-remote", action="store_true", help="allow listening on interfaces beyond loopback"
    )
    _add_watch_flags(collect)
    collect.add_argument(
        "--curve-secret",
        type=Path,
        default=None,
        help="CURVE: the collector's secret key file (from `ranklog keys`); encrypts and "
        "authenticates every connection",
    )
    collect.add_argument(
        "--curve-allow",
        type=Path,
        default=None,
        help="CURVE: directory of allowed client public key files (*.key)",
    )


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_watch_flags(collect: argparse.ArgumentParser) -> None:
    """Flags of ``collect`` for watching the job: stalls and ``/metrics``."""
    collect.add_argument(
        "--stall-timeout",
        type=float,
        default=os.environ.get(STALL_TIMEOUT_ENV, ServeSettings.stall_timeout),
        help=f"seconds a rank that is heard may go without stepping while others step before "
        f"it counts as stalled (rank_stalled); 0 turns it off (default: ${STALL_TIMEOUT_ENV} "
        f"or {ServeSettings.stall_timeout:g})",
    )
    collect.add_argument(
        "--job-stall-timeout",
        type=float,
        default=os.environ.get(JOB_STALL_TIMEOUT_ENV, ServeSettings.job_stall_timeout),
        help=f"the least seconds with every rank heard and none stepping before the job counts "
        f"as hung (job_stalled); more for a job whose steps or pauses are long (README: "
        f"watching a job); 0 turns it off (default: ${JOB_STALL_TIMEOUT_ENV} or "
        f"{ServeSettings.job_stall_timeout:g})",
    )
    collect.add_argument(
        "--metrics-port",
        type=int,
        default=os.environ.get(METRICS_PORT_ENV, ServeSettings.metrics_port),
        help=f"serve Prometheus metrics at http://HOST:PORT/metrics (default: ${METRICS_PORT_ENV}"
        ", else none)",
    )
    collect.add_argument(
        "--metrics-host", default=ServeSettings.metrics_host, help="address for --metrics-port"
    )
    collect.add_argument(
        "--export-metric",
        dest="export_metrics",
        type=_names,
        action="extend",
        metavar="NAMES",
        help="user metrics (comma-separated, repeatable: loss,lr) whose latest value per rank "
        "/metrics exports as ranklog_metric{name,rank}",
    )


class _Help(argparse.HelpFormatter):
    """``--help`` shows each flag's default once: not where its help says it already, and
    not where there is none (None, a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False
        if "default" in text or unset or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ranklog")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ranklog",
        description="Sidecar metrics collector for distributed training.",
        formatter_class=_Help,
        allow_abbrev=False,  # --logger-typ is a mistake, not --logger-type
    )
    parser.add_argument("--version", action="version", version=f"ranklog {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    backend_flags = _backend_flags()
    collect = commands.add_parser(
        "collect",
        parents=[backend_flags],
        help="run the collector",
        formatter_class=_Help,
        allow_abbrev=False,
        description="Receive every rank's metric records and write them to the backends.",
    )
    _add_serve_flags(collect)
    replay = commands.add_parser(
        "replay",
        parents=[backend_flags],
        help="bring backends up to date from the journal",
        formatter_class=_Help,
        allow_abbrev=False,
        description="Write what the journal holds to backends that lack it: a backend added "
        "later, or one that failed. --from-start rebuilds them completely.",
    )
    replay.add_argument(
        "--from-start",
        action="store_true",
        help="rebuild from the journal's first record (empties the backends' files first)",
    )
    keys = commands.add_parser(
        "keys",
        help="generate a CURVE key pair",
        formatter_class=_Help,
        allow_abbrev=False,
        description="Write NAME.key (public) and NAME.key_secret into DIR. Give the "
        "collector its secret with --curve-secret and put each rank's public key into the "
        "directory named by --curve-allow.",
    )
    keys.add_argument("--out", type=Path, default=Path("."), help="directory for the key files")
    keys.add_argument("--name", default="collector", help="base name of the key files")
    add_top_command(commands, _Help)
    return parser

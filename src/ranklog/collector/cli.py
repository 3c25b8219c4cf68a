"""``ranklog`` command line: ``collect``, ``replay``, ``keys``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from ranklog.collector.collector import DEFAULT_BIND, Collector
from ranklog.endpoints import ENDPOINT_ENV
from ranklog.errors import ConfigError
from ranklog.names import DEFAULT_POLICY_TIMEOUT
from ranklog.reporting import log_to_stderr


def _backend_flags() -> argparse.ArgumentParser:
    """Flags that say what the backends are: shared by ``collect`` and ``replay``."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--output-dir", "--output_dir", default="logs", help="where backends write")
    flags.add_argument(
        "--logger-type",
        "--logger_type",
        default="async",
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
        default=DEFAULT_POLICY_TIMEOUT,
        help="seconds a mean/min/max/sum step waits for missing ranks before it is emitted "
        "as partial",
    )
    flags.add_argument("--world-size", type=int, default=None, help="ranks to expect")
    flags.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds backends get to drain on shutdown; one still busy then is abandoned "
        "(what it missed stays in the journal: `ranklog replay` writes it later)",
    )
    flags.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return flags


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ranklog", description="Sidecar metrics collector for distributed training."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    backend_flags = _backend_flags()
    collect = commands.add_parser(
        "collect",
        parents=[backend_flags],
        help="run the collector",
        description="Receive every rank's metric records and write them to the backends.",
    )
    collect.add_argument(
        "--bind",
        default=os.environ.get(ENDPOINT_ENV, DEFAULT_BIND),
        help=f"ZeroMQ endpoint to listen on (default: ${ENDPOINT_ENV} or {DEFAULT_BIND}); "
        "tcp://127.0.0.1:* picks a free port",
    )
    collect.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once every rank said goodbye or went silent",
    )
    collect.add_argument(
        "--silence-timeout",
        type=float,
        default=60.0,
        help="seconds without a heartbeat before a rank counts as gone",
    )
    collect.add_argument(
        "--status-interval", type=float, default=30.0, help="seconds between status lines"
    )
    collect.add_argument(
        "--allow-remote", action="store_true", help="allow listening on interfaces beyond loopback"
    )
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
    replay = commands.add_parser(
        "replay",
        parents=[backend_flags],
        help="bring backends up to date from the journal",
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
        description="Write NAME.key (public) and NAME.key_secret into DIR. Give the "
        "collector its secret with --curve-secret and put each rank's public key into the "
        "directory named by --curve-allow.",
    )
    keys.add_argument("--out", type=Path, default=Path("."), help="directory for the key files")
    keys.add_argument("--name", default="collector", help="base name of the key files")
    return parser


def _make_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    args.out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(args.out), args.name)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


def _collector(args: argparse.Namespace) -> Collector:
    live = args.command == "collect"
    return Collector(
        args.bind if live else DEFAULT_BIND,
        output_dir=args.output_dir,
        logger_types=args.logger_type,
        run_name=args.run_name,
        config=args.config,
        world_size=args.world_size,
        exit_when_done=live and args.exit_when_done,
        silence_timeout=args.silence_timeout if live else 60.0,
        drain_timeout=args.drain_timeout,
        status_interval=args.status_interval if live else 30.0,
        allow_remote=live and args.allow_remote,
        policy=args.policy,
        policy_timeout=args.policy_timeout,
        curve_secret=args.curve_secret if live else None,
        curve_allow=args.curve_allow if live else None,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys":
        return _make_keys(args)
    log_to_stderr(logging.WARNING if args.quiet else logging.INFO)
    try:
        collector = _collector(args)
    except ConfigError as exc:
        print(f"ranklog {args.command}: {exc}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("%s received; draining", signal.Signals(signum).name)
        collector.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        code = (
            collector.run()
            if args.command == "collect"
            else collector.replay(from_start=args.from_start)
        )
    except ConfigError as exc:
        print(f"ranklog {args.command}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

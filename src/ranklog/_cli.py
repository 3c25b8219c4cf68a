"""``ranklog`` command line: ``ranklog collect ...``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

from ranklog._collector import DEFAULT_BIND, Collector
from ranklog._endpoint import ENDPOINT_ENV
from ranklog._errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ranklog", description="Sidecar metrics collector for distributed training."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    collect = commands.add_parser(
        "collect",
        help="run the collector",
        description="Receive every rank's metric records and write them to the backends.",
    )
    collect.add_argument(
        "--bind",
        default=os.environ.get(ENDPOINT_ENV, DEFAULT_BIND),
        help=f"ZeroMQ endpoint to listen on (default: ${ENDPOINT_ENV} or {DEFAULT_BIND}); "
        "tcp://127.0.0.1:* picks a free port",
    )
    collect.add_argument("--output-dir", "--output_dir", default="logs", help="where backends write")
    collect.add_argument(
        "--logger-type", "--logger_type", default="async",
        help="comma-separated backends: async (JSONL), tensorboard, wandb",
    )
    collect.add_argument("--run-name", "--run_name", default=None, help="run name; placeholders "
                         "{time}, {utc_time}, {rank}, {local_rank}")
    collect.add_argument("--config", default=None,
                         help="logging dictConfig (YAML or JSON) to run instead of --logger-type")
    collect.add_argument("--world-size", type=int, default=None, help="ranks to expect")
    collect.add_argument("--exit-when-done", action="store_true",
                         help="exit once every rank said goodbye or went silent")
    collect.add_argument("--silence-timeout", type=float, default=60.0,
                         help="seconds without a heartbeat before a rank counts as gone")
    collect.add_argument("--drain-timeout", type=float, default=10.0,
                         help="seconds backends get to drain on shutdown")
    collect.add_argument("--status-interval", type=float, default=30.0,
                         help="seconds between status lines")
    collect.add_argument("--allow-remote", action="store_true",
                         help="allow listening on interfaces beyond loopback")
    collect.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return parser


def _log_to_stderr(quiet: bool) -> None:
    log = logging.getLogger("ranklog")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s ranklog %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False  # the collector's root logger belongs to the backends


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _log_to_stderr(args.quiet)
    try:
        collector = Collector(
            args.bind,
            output_dir=args.output_dir,
            logger_types=args.logger_type,
            run_name=args.run_name,
            config=args.config,
            world_size=args.world_size,
            exit_when_done=args.exit_when_done,
            silence_timeout=args.silence_timeout,
            drain_timeout=args.drain_timeout,
            status_interval=args.status_interval,
            allow_remote=args.allow_remote,
        )
    except ConfigError as exc:
        print(f"ranklog collect: {exc}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("ranklog.collector").info(
            "%s received; draining", signal.Signals(signum).name
        )
        collector.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return collector.run()
    except ConfigError as exc:
        print(f"ranklog collect: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

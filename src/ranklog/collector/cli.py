"""``ranklog`` command line: ``collect``, ``replay``, ``keys``, ``top``."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from ranklog.collector.collector import replay, serve
from ranklog.collector.flags import build_parser
from ranklog.collector.settings import BackendSettings, ServeSettings
from ranklog.collector.top import run_top
from ranklog.errors import ConfigError
from ranklog.names import BACKEND_OPTIONS, backend_options
from ranklog.reporting import log_to_stderr

_log = logging.getLogger(__name__)
_Settings = TypeVar("_Settings", BackendSettings, ServeSettings)


def _make_keys(args: argparse.Namespace) -> int:
    import zmq.auth

    args.out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(args.out), args.name)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


def _settings(kind: type[_Settings], args: argparse.Namespace, **given: Any) -> _Settings:
    """``kind`` from the flags named as its fields (each flag's default is that field's)."""
    if kind is BackendSettings:
        given["options"] = backend_options({key: getattr(args, key) for key in BACKEND_OPTIONS})
    flags = {f.name: getattr(args, f.name) for f in fields(kind) if f.init and f.name not in given}
    return kind(**flags, **given)


def _check_output_dir(path: Path) -> None:
    """The output dir exists (or can be made) and takes files."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write to the output dir {path}: {exc.strerror or exc}") from None


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None


def _run(args: argparse.Namespace) -> int:
    """``collect`` or ``replay``; SIGTERM and SIGINT stop a collector, which then drains."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        _log.info("%s received; draining", signal.Signals(signum).name)
        stop.set()

    # Settings first: a bad flag fails before any signal handler is installed, and before
    # anything is created on disk.
    run: Callable[[], int]
    if args.command == "collect":
        backends = _settings(BackendSettings, args)
        run = partial(serve, _settings(ServeSettings, args, backends=backends), stop)
    else:  # replay ignores the stop request: the drain timeout bounds it already
        run = partial(replay, _settings(BackendSettings, args), from_start=args.from_start)
    if args.config is not None:
        _check_readable(Path(args.config))
    if args.command == "collect" or Path(args.output_dir).is_dir():  # replay makes none
        _check_output_dir(Path(args.output_dir))
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return run()


def _quiet_gc() -> None:
    """The receive loop holds a batch (up to 1,024 envelopes, their dicts, the frames) until
    it is journaled and acknowledged, then refcounting frees it all; at the default gen-0
    threshold (700) the cyclic collector ran several times per batch, scanning and promoting
    what was about to be freed (a fifth of the CPU of decoding and accounting). Collect
    every 50,000 net allocations instead; what startup loaded stays out of collections."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keys":
        return _make_keys(args)
    if args.command == "top":
        return run_top(args)
    log_to_stderr(logging.WARNING if args.quiet else logging.INFO)
    alerts = _alerts(args)
    _quiet_gc()
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"ranklog {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk or permission problem at run time: one line, the path
        where = f": {exc.filename}" if exc.filename else ""
        print(f"ranklog {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    finally:
        if alerts is not None:
            alerts.close()


def _alerts(args: argparse.Namespace) -> logging.Handler | None:
    """The embedded collector's warnings to rank 0's stderr as well (``--alert-fd``)."""
    if getattr(args, "alert_fd", None) is None:
        return None
    from ranklog.reporting import alert_to

    return alert_to(args.alert_fd, str(Path(args.output_dir) / "ranklog-collector.log"))


if __name__ == "__main__":
    sys.exit(main())

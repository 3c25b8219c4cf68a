"""``ranklog top``: a job live, one row per rank, from the collector's status socket.

It finds the collector serving ``--output-dir`` by the address in its
``.ranklog/status.json`` (``--connect ADDR`` names one directly), asks it for a snapshot
about once a second and draws it with rich. ``--once`` prints one snapshot; ``--json`` prints
it as JSON for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from ranklog.collector.status import STATUS_FILE
from ranklog.errors import ConfigError

_STATE_STYLES = {"running": "green", "stalled": "bold yellow", "silent": "bold red",
                 "finished": "dim"}  # fmt: skip


def add_top_command(commands: Any, formatter: type[argparse.HelpFormatter]) -> None:
    top = commands.add_parser(
        "top",
        help="watch a job live: a row per rank",
        formatter_class=formatter,
        allow_abbrev=False,
        description="Show every rank's state, step, step rate, lag and straggler scores, "
        "refreshed every second, from the collector serving --output-dir (or --connect).",
    )
    top.add_argument("--output-dir", "--output_dir", default="logs", help="the collector's")
    top.add_argument(
        "--connect", metavar="ADDR", help="the collector's status address (tcp://127.0.0.1:PORT)"
    )
    top.add_argument(
        "--metric", action="append", default=[], help="show this metric's latest value "
        "(repeatable)"
    )  # fmt: skip
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--json", action="store_true", help="with --once: print it as JSON")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the collector's answer"
    )


def find_collector(output_dir: Path) -> str:
    """The status address of the collector serving ``output_dir``."""
    path = output_dir / STATUS_FILE
    try:
        return str(json.loads(path.read_text())["endpoint"])
    except FileNotFoundError:
        raise ConfigError(
            f"no collector is serving {output_dir} (no {path}); is it running? "
            "--connect ADDR names one directly"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


class StatusClient:
    """Asks a collector's status socket for snapshots (a REQ socket, made anew after a
    request that got no answer)."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._context = zmq.Context()
        self._sock: zmq.Socket[Any] | None = None

    def ask(self, metrics: list[str]) -> dict[str, Any]:
        if not self.endpoint:
            raise ConfigError("waiting for a collector to serve this output dir")
        if self._sock is None:
            self._sock = self._context.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.endpoint)
        self._sock.send(json.dumps({"metrics": metrics}).encode())
        if not self._sock.poll(int(self.timeout * 1000), zmq.POLLIN):
            self._sock.close()
            self._sock = None
            raise ConfigError(
                f"the collector at {self.endpoint} did not answer in {self.timeout:g}s"
            )
        reply: dict[str, Any] = json.loads(self._sock.recv())
        if "error" in reply:
            raise ConfigError(f"the collector at {self.endpoint} says: {reply['error']}")
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._context.term()


def render(snapshot: dict[str, Any], metrics: list[str]) -> Any:
    """The rich table for one snapshot: a header line, then a row per rank."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    backends = ", ".join(f"{b['name']} {_bytes(b['lag_bytes'])}" for b in snapshot["backends"])
    title = Text(
        f"job {snapshot['run'] or '-'} | {snapshot['records_per_s']:.0f} records/s, "
        f"{snapshot['records_total']} in all | leader step {_text(snapshot['leader_step'])} | "
        f"backends' lag: {backends or '-'}"
    )
    if snapshot.get("job_stalled_s") is not None:
        title.append(" | ")
        title.append(f"JOB STALLED: no rank stepped for {snapshot['job_stalled_s']:.0f}s",
                     style="bold red")  # fmt: skip
    table = Table(expand=False)
    for column in ("rank", "host", "state", "step", "steps/s", "lag", "relative",
                   "individual", *metrics, "dropped", "resent"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("host", "state") else "right")
    for row in snapshot["ranks"]:
        style = _STATE_STYLES.get(row["state"].split(":")[0], "")
        table.add_row(
            str(row["rank"]), row["host"], f"[{style}]{row['state']}[/]" if style else row["state"],
            _text(row["step"]), _text(row["steps_per_s"], ".1f"), _text(row["lag"]),
            _text(row["relative"], ".2f"), _text(row["individual"], ".2f"),
            *(_text(row["metrics"].get(name), ".4g") for name in metrics),
            str(row["dropped"]), str(row.get("resent", 0)),
        )  # fmt: skip
    return Group(title, table)


def _text(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def _bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size //= 1024
    return f"{size} GiB"


def run_top(args: argparse.Namespace) -> int:
    """``ranklog top``: 0 on ``q``, Ctrl-C, once its collector exited (said in one line), or
    after ``--once``; 2 when ``--once`` gets no answer."""
    once = args.once or args.json
    try:
        # Live, a collector that is still starting (or restarting) is waited for.
        where = args.connect or _find(Path(args.output_dir), "" if not once else None)
        client = StatusClient(where, args.timeout)
        try:
            return _once(client, args) if once else _live(client, args)
        finally:
            client.close()
    except ConfigError as exc:
        print(f"ranklog top: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _once(client: StatusClient, args: argparse.Namespace) -> int:
    snapshot = client.ask(args.metric)
    if args.json:
        print(json.dumps(snapshot, default=repr))
    else:
        from rich.console import Console

        # Not a terminal: wide enough for every column rather than 80 characters.
        Console(width=None if sys.stdout.isatty() else 200).print(render(snapshot, args.metric))
    return 0


def _live(client: StatusClient, args: argparse.Namespace) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    answered, gone = False, ""
    hint = Text("q quits", style="dim")
    with _Keys() as keys, Live(Text("asking the collector..."), auto_refresh=False) as live:
        while True:
            try:
                shown = render(client.ask(args.metric), args.metric)
                answered = True
            except ConfigError as exc:
                shown = Text(f"{exc}; retrying", style="bold red")
                if not args.connect:  # a restarted collector listens elsewhere
                    before, client.endpoint = client.endpoint, _find(Path(args.output_dir), "")
                    gone = _exited(Path(args.output_dir), before) if answered else ""
                    if gone:
                        live.update(Text(""), refresh=True)
                        break
            live.update(Group(shown, hint), refresh=True)
            if keys.quit_within(args.interval):
                return 0
    print(f"ranklog top: {gone}")
    return 0


def _exited(output_dir: Path, endpoint: str) -> str:
    """Why the collector that answered at ``endpoint`` is gone for good ('' if it may
    come back: it still runs, or another one serves the dir now)."""
    path = output_dir / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):  # removed as it exited
        return f"the collector serving {output_dir} has exited"
    if status.get("endpoint") != endpoint:
        return ""
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return f"the collector serving {output_dir} (pid {status['pid']}) has exited"
    except (OSError, KeyError, TypeError, ValueError):
        pass
    return ""


class _Keys:
    """Single key presses on a terminal (``q`` quits), read without waiting for Enter."""

    def __enter__(self) -> _Keys:
        self._saved: list[Any] | None = None
        if sys.stdin.isatty():
            import termios
            import tty

            self._saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin)  # Ctrl-C still interrupts
        return self

    def quit_within(self, seconds: float) -> bool:
        """Wait ``seconds`` for ``q``; True if it was pressed."""
        if self._saved is None:
            time.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            pressed = select.select([sys.stdin], [], [], left)[0]
            if pressed and os.read(sys.stdin.fileno(), 1) in (b"q", b"Q"):
                return True
        return False

    def __exit__(self, *exc_info: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, self._saved)


def _find(output_dir: Path, otherwise: str | None) -> str:
    """:func:`find_collector`, or ``otherwise`` where none is found (None: raise)."""
    try:
        return find_collector(output_dir)
    except ConfigError:
        if otherwise is None:
            raise
        return otherwise

"""Which collector serves an output dir, and whether the last one stopped cleanly.

A collector writes ``.ranklog/collector.json`` (its host and pid) when it starts serving and
removes it when it stops. Finding one at start means either that collector is still running
(two collectors on one journal would interleave it: refused), or it was killed: then this
one continues that job, and the goodbyes its ranks already said count. A clean stop leaves
nothing, so the next collector on the dir serves a new job, and an earlier job's goodbyes
never end it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path

from ranklog.errors import ConfigError
from ranklog.journal import STATE_DIR

_log = logging.getLogger(__name__)
MARKER = "collector.json"


def claim(output_dir: Path) -> bool:
    """Mark ``output_dir`` as served by this process; True if a killed collector's mark was
    there (this run resumes its job). Raises ConfigError if a live collector holds it."""
    path = output_dir / STATE_DIR / MARKER
    previous = _read(path)
    if previous is not None and _alive(previous):
        raise ConfigError(
            f"another collector (pid {previous['pid']}) is serving {output_dir}; stop it, or "
            "give this one another --output-dir"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return previous is not None


def live_owner(output_dir: Path) -> int | None:
    """The pid of the collector (on this host) serving ``output_dir`` now, if one is."""
    previous = _read(output_dir / STATE_DIR / MARKER)
    if previous is None or not _alive(previous):
        return None
    pid = previous.get("pid")
    return pid if isinstance(pid, int) else None


def release(output_dir: Path) -> None:
    """This collector stopped cleanly: the next one serves a new job."""
    path = output_dir / STATE_DIR / MARKER
    previous = _read(path)
    if previous is not None and previous.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()


def _read(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else {}


def _alive(mark: dict[str, object]) -> bool:
    """The marking collector still runs (on this host; another host's cannot be asked)."""
    pid = mark.get("pid")
    if mark.get("host") != socket.gethostname() or not isinstance(pid, int):
        _log.warning(
            "%s was marked by a collector on host %s that cannot be asked from here; "
            "taking it over as if that collector had stopped",
            MARKER,
            mark.get("host"),
        )
        return False
    if pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ranklog" in cmdline and b"collect" in cmdline

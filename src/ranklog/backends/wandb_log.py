"""Reading a W&B ``.wandb`` transaction log: LevelDB-log framed protobuf ``Record``s.

The file starts with a 7-byte header (``:W&B``, magic ``0xBEE1``, version), then 32 KiB
blocks of chunks, each ``crc32 (4, little-endian) | length (2) | type (1) | data``, the CRC
being zlib's CRC-32 of the type byte and the data; a record is one FULL chunk or FIRST,
MIDDLE..., LAST. wandb no longer ships a Python reader. The collector uses this to learn how
far an offline run got before a crash and when a finished run is complete on disk; the
tests use it to read runs back. Beside it, what the backend does with W&B's logs and
service on disk: how far a run got, its empty logs, W&B's exit work.
"""

from __future__ import annotations

import logging
import shutil
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_log = logging.getLogger("ranklog.backends.wandb")  # its lines read as the backend's
_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_IDENT, _MAGIC = b":W&B", 0xBEE1
HEADER_BYTES = _HEADER.size
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path, *, strict: bool = True) -> Iterator[Any]:
    """Every ``Record`` in a ``.wandb`` file, in order. A bad header or CRC raises; with
    ``strict=False`` a torn or corrupt tail (a crash mid-write) just ends the log."""
    from wandb.proto import wandb_internal_pb2  # the collector side: wandb is installed

    data = path.read_bytes()
    if len(data) < HEADER_BYTES:
        # Created, then a power cut before W&B's service wrote its header to disk.
        if not strict:
            return
        raise ValueError(f"{path}: not a W&B transaction log ({len(data)} bytes, no header)")
    ident, magic, _version = _HEADER.unpack_from(data)
    if ident != _IDENT or magic != _MAGIC:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK.size:  # the writer pads a block tail too short for a chunk
            pos += left_in_block
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        if kind == 0 and length == 0:
            continue
        if zlib.crc32(bytes([kind]) + chunk) != crc or len(chunk) < length:
            if not strict:
                return
            raise ValueError(f"{path}: CRC mismatch at byte {pos - length - _CHUNK.size}")
        if kind == _FULL:
            yield wandb_internal_pb2.Record.FromString(chunk)  # type: ignore[attr-defined]
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield wandb_internal_pb2.Record.FromString(pending + chunk)  # type: ignore[attr-defined]
            pending = b""


def last_step(path: Path) -> int | None:
    """The highest ``_step`` among the history rows an offline run wrote (None if none)."""
    import json

    steps = [
        json.loads(item.value_json)
        for record in records(path, strict=False)
        if record.WhichOneof("record_type") == "history"
        for item in record.history.item
        if (item.key or ".".join(item.nested_key)) == "_step"  # wandb writes either
    ]
    return max(steps, default=None)


def finished(path: Path) -> bool:
    """Whether the log holds its run's exit record, and so every row logged before it."""
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in records(path, strict=False))
    except (OSError, ValueError):  # not there yet
        return False


def wait_finished(path: Path, timeout: float) -> bool:
    """Wait (at most ``timeout`` s) until the log holds its run's exit record.

    ``run.finish()`` returns once W&B's service has the exit record, but the service keeps
    the log's last block in memory until it closes the run's stream, a moment later (it is
    told to without waiting for an answer). Until then the file may hold no row at all."""
    deadline, size = time.monotonic() + timeout, -1
    while True:
        now_size = path.stat().st_size if path.exists() else 0
        if now_size != size:  # read it again only once it grew
            size = now_size
            if finished(path):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def wait_service_gone(parent_pid: int | None, timeout: float = 30.0) -> bool:
    """Wait (at most ``timeout`` s) until no W&B service started by ``parent_pid`` runs.

    The service (``wandb-core --pid PARENT``) outlives a process killed with -9 until it
    notices, and holds the run's last block in memory until it exits: a log that has not
    grown for a moment may still be missing rows that land once it does. False if it still
    runs when ``timeout`` has passed."""
    if parent_pid is None:
        return True
    marker = f"\0--pid\0{parent_pid}\0".encode()
    deadline = time.monotonic() + timeout
    while any(b"wandb-core" in line and marker in line + b"\0" for line in _cmdlines()):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _cmdlines() -> Iterator[bytes]:
    """Every process's command line, NUL-separated (Linux's /proc; elsewhere none)."""
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            yield proc.read_bytes()
        except OSError:
            continue  # ended meanwhile


def settle(log: Path, quiet: float = 0.5, timeout: float = 10.0) -> None:
    """Wait until a crashed run's log stops growing: W&B's service process outlives the
    collector that fed it and writes out the rows it already had, a moment later. Reading
    the log before that would resume before rows that then land, and log them twice."""
    deadline = time.monotonic() + timeout
    size, still_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_size = log.stat().st_size if log.exists() else 0
        if now_size != size:
            size, still_since = now_size, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return
        time.sleep(0.05)


def logged_through(wandb_dir: Path | None, run_id: str | None) -> int | None:
    """The last step the logs of run ``run_id`` under ``wandb_dir`` hold (None if none)."""
    if run_id is None or wandb_dir is None:
        return None
    steps = (last_step(log) for log in _run_logs(wandb_dir, run_id))
    return max((step for step in steps if step is not None), default=None)


def _run_logs(wandb_dir: Path, run_id: str) -> Iterator[Path]:
    """The logs of run ``run_id``: one per segment (``offline-run-<time>-<id>/``), as W&B
    starts a folder each time the run is resumed."""
    return wandb_dir.glob(f"*{run_id}*/run-{run_id}.wandb")


def teardown_within(timeout: float) -> bool:
    """Let wandb's service write out what it still holds, waiting at most ``timeout`` s.

    wandb does this itself at interpreter exit. A collector that must leave with
    ``os._exit`` (because some backend hung) calls this first, so that a healthy W&B run is
    complete on disk; the bound keeps a hung W&B from holding the exit. Returns whether it
    finished in time (True when wandb was never imported).
    """
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return True
    worker = threading.Thread(target=wandb.teardown, name="wandb-teardown", daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


def remove_empty_logs(wandb_dir: Path, run_id: str) -> None:
    """Remove the run's folders whose log has no header: wandb.init created them, then a
    crash or power cut came before W&B's service wrote anything durable. Left there, they
    would make ``wandb sync`` fail. (A checkpoint never lists such a log with a size.)"""
    for log in _run_logs(wandb_dir, run_id):
        try:
            if log.stat().st_size < HEADER_BYTES:
                shutil.rmtree(log.parent)
                _log.info("backend wandb: removed %s: a crash left its log empty", log.parent)
        except OSError as exc:
            _log.warning("backend wandb: could not remove the empty %s (%s)", log.parent, exc)

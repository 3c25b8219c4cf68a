"""Read a W&B run back from its ``.wandb`` transaction log, as ``wandb sync`` would.

The file is LevelDB-log framed: a 7-byte header (``:W&B``, magic ``0xBEE1``, version),
then 32 KiB blocks of chunks, each ``crc32 (4, little-endian) | length (2) | type (1) |
data``, where the CRC is zlib's CRC-32 of the type byte and the data, and a record is one
FULL chunk or FIRST, MIDDLE..., LAST. Each record is a ``wandb_internal_pb2.Record``.
wandb no longer ships a Python reader, so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_IDENT, _MAGIC = b":W&B", 0xBEE1
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """Every ``Record`` in a ``.wandb`` file, in order; raise on a bad header or CRC."""
    data = path.read_bytes()
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
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: CRC mismatch at byte {pos - length - _CHUNK.size}")
        if kind == _FULL:
            yield wandb_internal_pb2.Record.FromString(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield wandb_internal_pb2.Record.FromString(pending + chunk)
            pending = b""


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class WandbRun:
    """What a user sees of an offline run: its name, config and history rows."""

    path: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def read_run(run_dir: Path) -> WandbRun:
    """Read ``<dir>/wandb/offline-run-*/`` (the folder holding ``run-<id>.wandb``)."""
    (log_file,) = run_dir.glob("run-*.wandb")
    run = WandbRun(log_file)
    for record in records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.name = record.run.display_name
            run.project = record.run.project
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
            for item in record.config.remove:
                run.config.pop(_key(item), None)
        elif kind == "history":
            run.history.append(
                {_key(item): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "exit":
            run.finished = True
    run.config.pop("_wandb", None)
    return run


def offline_runs(log_dir: Path) -> list[Path]:
    """The offline run folders W&B wrote under ``log_dir`` (``dir=log_dir``)."""
    return sorted((log_dir / "wandb").glob("offline-run-*"))

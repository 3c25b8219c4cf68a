"""Read a W&B offline run back from disk, as ``wandb sync`` would: its name, config and
history rows, from the ``.wandb`` transaction log.

wandb 0.31 ships no Python reader for it (its sync is in Go), so the log is read here from
W&B's documented format, sharing nothing with ``ranklog.backends`` (whose own reader decides
where a run resumes: a bug there must not hide itself here). The format, as W&B's former
``wandb/sdk/internal/datastore.py`` documents it: a header (``ident: char[4]`` ``:W&B``,
``magic: uint16`` 0xBEE1, ``version: uint8``), then LevelDB's log format
(github.com/google/leveldb, ``doc/log_format.md``): 32 KiB blocks, the header counting in
the first; each block a sequence of ``checksum: uint32, length: uint16, type: uint8,
data[length]`` (little-endian; W&B's checksum is the plain CRC-32 of type and data, not
LevelDB's masked CRC-32C), a tail shorter than 7 bytes being zero padding; a user record is
one FULL fragment or FIRST, MIDDLE..., LAST. Each user record is a serialized
``wandb_internal_pb2.Record``, decoded with W&B's own protobuf class.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_BYTES = 32 * 1024
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
FRAGMENT_HEADER = struct.Struct("<IHB")  # checksum, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _user_records(data: bytes) -> Iterator[bytes]:
    """The user records of a LevelDB log, block by block; damage raises ValueError."""
    ident, magic, _ = FILE_HEADER.unpack_from(data)
    if (ident, magic) != (b":W&B", 0xBEE1):
        raise ValueError(f"not a W&B log: header {data[: FILE_HEADER.size]!r}")
    assembled: bytearray | None = None
    for block_start in range(0, len(data), BLOCK_BYTES):
        block = data[block_start : block_start + BLOCK_BYTES]
        at = FILE_HEADER.size if block_start == 0 else 0
        while at + FRAGMENT_HEADER.size <= len(block):
            checksum, length, kind = FRAGMENT_HEADER.unpack_from(block, at)
            if kind == 0 and length == 0:
                break  # zero padding: the rest of this block holds nothing
            payload = block[at + FRAGMENT_HEADER.size : at + FRAGMENT_HEADER.size + length]
            if len(payload) != length or zlib.crc32(bytes([kind]) + payload) != checksum:
                raise ValueError(f"damaged fragment at byte {block_start + at}")
            at += FRAGMENT_HEADER.size + length
            if kind == FULL:
                yield payload
            elif kind == FIRST:
                assembled = bytearray(payload)
            elif kind in (MIDDLE, LAST) and assembled is not None:
                assembled += payload
                if kind == LAST:
                    yield bytes(assembled)
                    assembled = None
            else:
                raise ValueError(f"fragment type {kind} out of place at byte {block_start + at}")


def records(path: Path) -> Iterator[Any]:
    """Every ``Record`` in a ``.wandb`` file, decoded by W&B's own protobuf class."""
    from wandb.proto import wandb_internal_pb2

    for payload in _user_records(path.read_bytes()):
        yield wandb_internal_pb2.Record.FromString(payload)  # type: ignore[attr-defined]


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

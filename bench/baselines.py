"""In-process handlers that ranklog is measured against.

Minimal, faithful re-implementations of InstructLab training's ``logger.py`` handlers (its
``AsyncStructuredHandler`` with ``async_logger.AsyncStructuredLogger``, ``TensorBoardHandler``
and ``WandbHandler``), running in the training process as InstructLab runs them, plus the
floor of ranklog's own design. Only the parts on the caller's path are reproduced; what
InstructLab does per record is kept (flatten, timestamp, one ``add_scalar`` per key, one
``run.log`` per record, open-append-close per JSONL line).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import msgpack
import zmq


def flatten(log_dict: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """InstructLab's ``_flatten_dict``."""
    flat: dict[str, Any] = {}
    for key, value in log_dict.items():
        if isinstance(value, Mapping):
            flat |= flatten(value, sep=sep, prefix=f"{prefix}{key}{sep}")
        else:
            flat[prefix + key] = value
    return flat


class FloorHandler(logging.Handler):
    """The floor of this design: a plain handler that packs the metrics with msgpack and
    sends them on a ZeroMQ PUSH socket without blocking (dropped if the peer is slow).

    No envelope, no buffer, no acknowledgement: what ranklog does beyond this is its cost.
    """

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._packer = msgpack.Packer()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self._packer.pack({"msg": record.msg, "step": getattr(record, "step", None)})
            self._sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            pass
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close(0)
        self._context.term()
        super().close()


class SyncJsonlHandler(logging.Handler):
    """InstructLab's JSONL write done synchronously on the caller's thread: flatten, add
    ``step`` and ``timestamp``, open the file for append, write one line, close."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        data = flatten(record.msg)  # type: ignore[arg-type]
        step = getattr(record, "step", None)
        if step:
            data.setdefault("step", step)
        data["timestamp"] = datetime.now().isoformat()
        with open(self.path, "a") as out:
            out.write(json.dumps(data, indent=None) + "\n")


class InstructLabAsyncJsonlHandler(logging.Handler):
    """InstructLab's ``AsyncStructuredHandler``: ``log_sync`` hands the dict to an asyncio
    loop on a thread of its own (``run_coroutine_threadsafe``), whose coroutine keeps every
    record in a list and appends one line to the file (aiofiles: open and write run in the
    loop's thread pool)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.logs: list[dict[str, Any]] = []
        self._handed: list[Any] = []  # only so that drain() can wait; InstructLab drops them
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    async def _log(self, data: dict[str, Any]) -> None:
        data["timestamp"] = datetime.now().isoformat()
        self.logs.append(data)
        line = json.dumps(data, indent=None) + "\n"
        await self.loop.run_in_executor(None, self._append, line)

    def _append(self, line: str) -> None:
        with open(self.path, "a") as out:
            out.write(line)

    def emit(self, record: logging.LogRecord) -> None:
        data = flatten(record.msg)  # type: ignore[arg-type]
        step = getattr(record, "step", None)
        if step:
            data.setdefault("step", step)
        self._handed.append(asyncio.run_coroutine_threadsafe(self._log(data), self.loop))

    def drain(self) -> None:
        """Wait until every record handed over so far is written (not part of the timing)."""
        for future in self._handed:
            future.result(60)
        self._handed.clear()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        super().close()


class TensorBoardHandler(logging.Handler):
    """InstructLab's ``TensorBoardHandler``: torch's ``SummaryWriter``, one ``add_scalar``
    per flattened key."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def emit(self, record: logging.LogRecord) -> None:
        flat = flatten(record.msg)  # type: ignore[arg-type]
        step = getattr(record, "step", None)
        for key, value in flat.items():
            try:
                float(value)
            except ValueError:
                self.writer.add_text(key, value, global_step=step)
            except TypeError:
                pass
            else:
                self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()
        super().close()


class WandbHandler(logging.Handler):
    """InstructLab's ``WandbHandler`` with ``mode="offline"``: one ``run.log`` per record."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__()
        import wandb

        self.run = wandb.init(mode="offline", dir=str(log_dir), project="ranklog-bench", config={})

    def emit(self, record: logging.LogRecord) -> None:
        flat = flatten(record.msg)  # type: ignore[arg-type]
        self.run.log(flat, step=getattr(record, "step", None))

    def close(self) -> None:
        self.run.finish()
        super().close()

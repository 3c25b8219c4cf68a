"""``AsyncStructuredHandler``: InstructLab's JSONL metrics files, one open file per path."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ranklog.backends.arguments import reject_unknown
from ranklog.backends.owned_files import OwnedFiles, cut_back
from ranklog.backends.protocol import EnvelopeItem
from ranklog.backends.records import build_record
from ranklog.filters import IsMappingFilter
from ranklog.flatten import flatten_dict
from ranklog.run_name import DEFAULT_JSONL_NAME, path_inside, run_name_for

_WRITE_BYTES = 1 << 16
_monotonic = time.monotonic


def _plain(value: Any) -> Any:
    """What the standard ``json`` cannot write: a numpy value as its Python value, anything
    else as its ``repr`` (as orjson's ``default=repr``)."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else repr(value)


def _json_line(entry: dict[str, Any]) -> bytes:
    # The seed's json: NaN, Infinity and -Infinity as such (json.loads reads them back).
    stamp = entry.get("timestamp")
    if type(stamp) is datetime:  # as orjson writes it
        entry = {**entry, "timestamp": stamp.isoformat()}
    text = json.dumps(entry, default=_plain, ensure_ascii=False, separators=(",", ":"))
    return text.encode() + b"\n"


def _non_finite(value: Any) -> bool:
    """Whether ``value`` holds a NaN or an infinity (orjson writes those as null)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list | tuple):
        return any(map(_non_finite, value))
    if isinstance(value, Mapping):
        return any(map(_non_finite, value.values()))
    if getattr(value, "dtype", None) is not None and value.dtype.kind == "f":  # numpy
        return _non_finite(value.tolist())
    return False


def _json_encoder() -> Callable[[dict[str, Any]], bytes]:
    try:
        import orjson
    except ImportError:
        return _json_line
    options = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
    dumps = orjson.dumps

    def encode(entry: dict[str, Any]) -> bytes:
        line = dumps(entry, default=repr, option=options)
        # Values arrive as logged: orjson writes NaN and infinities as null, so a line that
        # has a null (rare) is checked, and written by json if one of them is the cause.
        # (rfind: CPython's ``in`` and ``find`` take twice as long on a line this short.)
        if line.rfind(b"null") >= 0 and any(map(_non_finite, entry.values())):
            return _json_line(entry)
        return line

    return encode


_SCALAR_TYPES = frozenset({float, int, str, bool, type(None)})
_STR_TYPE = frozenset({str})


def _flatten(msg: Mapping[Any, Any]) -> dict[str, Any]:
    """``flatten_dict(msg)``; a flat dict of numbers (the usual record) skips its per-value
    ``isinstance(value, Mapping)``, which costs more than the rest of a line put together."""
    if _SCALAR_TYPES.issuperset(map(type, msg.values())) and _STR_TYPE.issuperset(map(type, msg)):
        return dict(msg)
    return flatten_dict(msg)


class _Timestamps:
    """``datetime.fromtimestamp(t).isoformat()``, with the text down to the second cached.

    Microseconds are rounded as ``fromtimestamp`` rounds them (half to even, carrying into
    the second), so the text is the same; only the date arithmetic runs once a second.
    """

    def __init__(self) -> None:
        self._second = float("nan")
        self._text = ""

    def __call__(self, created: float) -> str:
        fraction, second = math.modf(created)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            second += 1.0
            micros -= 1_000_000
        elif micros < 0:
            second -= 1.0
            micros += 1_000_000
        if second != self._second:
            self._text = datetime.fromtimestamp(second).isoformat()
            self._second = second
        return f"{self._text}.{micros:06d}" if micros else self._text


class _JsonlFile:
    """One output file: our own write buffer over an unbuffered descriptor, so that what
    reached the file is always known exactly (its size) and unwritten bytes can be dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size
        self.pending = bytearray()

    def write(self, line: bytes) -> None:
        self.pending += line
        if len(self.pending) >= _WRITE_BYTES:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            written = os.write(self.fd, self.pending)
            del self.pending[:written]
            self.size += written

    def discard(self) -> None:
        self.pending.clear()
        os.close(self.fd)


class AsyncStructuredHandler(logging.Handler):
    """Append each metrics dict as one JSON line: flattened keys, ``step``, ``timestamp``.

    The file is ``log_dir/<run_name>.jsonl``; ``run_name`` defaults to
    ``training_params_and_metrics_global{rank}``. In the collector ``{rank}`` and
    ``{local_rank}`` are the rank the record came from, so each rank gets its own file.
    InstructLab's ``file_name`` argument names one file for all instead. Writes are
    buffered; a record written ``flush_interval`` seconds or more after the last flush
    flushes them, and so does ``close``; memory stays flat however long the run. There is
    no timer thread: in the backends' process the runner flushes at each checkpoint.

    Exactly once after a crash: it implements ``protocol.Rewindable`` (each file's size at a
    checkpoint, cut back to on restart or after a write error).

    >>> handler = AsyncStructuredHandler(log_dir="logs")  # doctest: +SKIP
    """

    #: No rank policy by default: every rank's records, each rank to its own file.
    default_rank_policy: str | None = None
    keeps_ranks_apart: bool = True

    def __init__(
        self,
        level: int | str = logging.INFO,
        run_name: str | None = None,
        log_dir: str | os.PathLike[str] = "logs",
        *,
        flush_interval: float = 1.0,
        file_name: str | os.PathLike[str] | None = None,
        **struct_init_kwargs: Any,
    ) -> None:
        reject_unknown(type(self).__name__, struct_init_kwargs, "file_name or flush_interval")
        super().__init__(level)
        self.log_dir = Path(log_dir)
        self.run_name = run_name
        self.file_name = Path(file_name) if file_name is not None else None
        self.flush_interval = flush_interval
        self._next_flush = 0.0  # the first record is written at once
        self._started = datetime.now()
        self._encode = _json_encoder()
        self._timestamp = _Timestamps()
        self._paths: dict[tuple[Any, Any], Path] = {}
        self._files: dict[Path, _JsonlFile] = {}
        # Crash recovery, driven by the collector: sizes to cut files back to before writing
        # again, and the files this handler opened (told to the collector before writing).
        self._restore: dict[str, int] = {}
        self._truncate_others = False
        self.owned_files = OwnedFiles()

    def path_for(self, record: logging.LogRecord) -> Path:
        """The file a record goes to (placeholders filled from the record's rank)."""
        key = (getattr(record, "rank", None), getattr(record, "local_rank", None))
        path = self._paths.get(key)
        if path is None:
            if self.file_name is not None:
                path = self.file_name
            else:
                name = run_name_for(
                    self.run_name, record, now=self._started, default_template=DEFAULT_JSONL_NAME
                )
                path = path_inside(self.log_dir, name, ".jsonl")
            self._paths[key] = path
        return path

    def emit(self, record: logging.LogRecord) -> None:
        if type(record.msg) is not dict and not isinstance(record.msg, Mapping):
            warnings.warn(
                f"AsyncStructuredHandler expected a mapping, got {type(record.msg).__name__}; "
                "skipping. Add IsMappingFilter to this handler.",
                stacklevel=2,
            )
            return
        try:
            line = self._line(_flatten(record.msg), getattr(record, "step", None), record.created)
            path = self.path_for(record)
            out = self._files.get(path)
            if out is None:
                out = self._open(path)
            out.write(line)
            if _monotonic() >= self._next_flush:
                self._flush_when_due()
        except Exception:
            self.handleError(record)

    def _line(self, entry: dict[str, Any], step: Any, created: float) -> bytes:
        """The JSON line of a flattened message (``entry``, changed here)."""
        if step is not None:
            entry.setdefault("step", step)
        if "timestamp" not in entry:
            entry["timestamp"] = self._timestamp(created)
        return self._encode(entry)

    # The collector's batch way (protocol.TakesEnvelopes): what handle() does, per envelope.

    def takes_envelopes(self) -> bool:
        """True unless a subclass changes what ``handle()`` does (it then gets LogRecords)
        or a filter other than IsMappingFilter is added."""
        cls = type(self)
        return all(getattr(cls, name) is method for name, method in _HANDLE_METHODS) and all(
            type(f) is IsMappingFilter for f in self.filters
        )

    def handle_envelopes(self, batch: Sequence[EnvelopeItem]) -> None:
        """``handle()`` for each record of ``batch``, as the lines ``emit`` writes. The
        timestamp goes to orjson as a datetime: it writes ``isoformat()``'s text, in C."""
        encode, stamp, out, rank = self._encode, datetime.fromtimestamp, None, None
        with self.lock:  # type: ignore[union-attr]
            for item in batch:
                envelope = item[0]
                msg = envelope.msg
                if type(msg) is not dict:  # text: IsMappingFilter drops it, emit warns
                    if not self.filters:
                        self.emit(build_record(*item))
                    continue
                try:
                    if out is None or rank != (envelope.rank, envelope.local_rank):
                        rank = (envelope.rank, envelope.local_rank)
                        out = self._file_for(rank, item)
                    # A flat message was decoded for this backend alone: it is the entry.
                    entry: dict[str, Any] = msg if envelope.flat else _flatten(msg)
                    if envelope.step is not None:
                        entry.setdefault("step", envelope.step)
                    if "timestamp" not in entry:
                        entry["timestamp"] = stamp(envelope.time)
                    out.write(encode(entry))
                except Exception:
                    self.handleError(build_record(*item))
            if _monotonic() >= self._next_flush:
                try:
                    self._flush_when_due()
                except Exception:
                    self.handleError(build_record(*batch[-1]))

    def _file_for(self, rank: tuple[int, int], item: EnvelopeItem) -> _JsonlFile:
        path = self._paths.get(rank)
        if path is None:
            path = self.path_for(build_record(*item))
        out = self._files.get(path)
        return self._open(path) if out is None else out

    def _flush_when_due(self) -> None:
        # On a full disk the bytes stay buffered; the next flush tries again.
        self._next_flush = _monotonic() + self.flush_interval
        self.flush()

    def _open(self, path: Path) -> _JsonlFile:
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = self._restore.get(str(path), 0 if self._truncate_others else None)
        if keep is not None and path.exists() and path.stat().st_size > keep:
            os.truncate(path, keep)
        out = self._files[path] = _JsonlFile(path)
        self.owned_files.opened(str(path), out.size)
        return out

    def checkpoint(self) -> dict[str, Any]:
        """Write out the buffers; return each file's size: what a restart may cut back to."""
        with self.lock:  # type: ignore[union-attr]
            for out in self._files.values():
                out.flush()
            return {"files": {str(path): out.size for path, out in self._files.items()}}

    def restore(self, state: dict[str, Any] | None, *, from_start: bool = False) -> None:
        """Before writing, cut the checkpointed files back to their sizes (``from_start``:
        empty them, and any other file this handler opens); the collector replays the rest."""
        sizes: dict[str, int] = (state or {}).get("files", {})
        self._restore = dict.fromkeys(sizes, 0) if from_start else dict(sizes)
        self._truncate_others = from_start
        cut_back(self._restore)  # now, not when reopened: one named after the start time is not

    def rewind_to(self, state: dict[str, Any] | None) -> None:
        """Drop unwritten buffers and cut every file back to a checkpoint (files opened since,
        back to their size at opening), to replay from there."""
        with self.lock:  # type: ignore[union-attr]
            for out in self._files.values():
                out.discard()
            self._files.clear()
            self._restore = self.owned_files.sizes_at(state)
            self._truncate_others = False

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            for out in self._files.values():
                out.flush()

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self.flush()
            finally:
                for out in self._files.values():
                    os.close(out.fd)
                self._files.clear()
        super().close()


# What handle() runs for a record: a subclass that changes any of them gets LogRecords.
_HANDLE_METHODS = tuple(
    (name, getattr(AsyncStructuredHandler, name))
    for name in ("handle", "filter", "emit", "path_for", "_line")
)

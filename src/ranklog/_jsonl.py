"""``AsyncStructuredHandler``: InstructLab's JSONL metrics files, one open file per path."""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from ranklog._flatten import flatten_dict
from ranklog._run_name import DEFAULT_JSONL_NAME, substitute_placeholders


def _json_encoder() -> Callable[[dict[str, Any]], bytes]:
    try:
        import orjson
    except ImportError:
        return lambda entry: json.dumps(entry, default=repr).encode() + b"\n"
    options = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
    return lambda entry: orjson.dumps(entry, default=repr, option=options)


class AsyncStructuredHandler(logging.Handler):
    """Append each metrics dict as one JSON line: flattened keys, ``step``, ``timestamp``.

    The file is ``log_dir/<run_name>.jsonl``; ``run_name`` defaults to
    ``training_params_and_metrics_global{rank}``. In the collector ``{rank}`` and
    ``{local_rank}`` are the rank the record came from, so each rank gets its own file.
    Writes are buffered and flushed every ``flush_interval`` seconds and on close; memory
    stays flat however long the run.

    >>> handler = AsyncStructuredHandler(log_dir="logs")  # doctest: +SKIP
    """

    def __init__(
        self,
        level: int | str = logging.INFO,
        run_name: str | None = None,
        log_dir: str | os.PathLike[str] = "logs",
        *,
        flush_interval: float = 1.0,
        **struct_init_kwargs: Any,
    ) -> None:
        super().__init__(level)
        self.log_dir = Path(log_dir)
        self.run_name = run_name
        self.file_name: Path | None = (
            Path(struct_init_kwargs.pop("file_name")) if "file_name" in struct_init_kwargs else None
        )
        self._started = datetime.now()
        self._encode = _json_encoder()
        self._paths: dict[tuple[Any, Any], Path] = {}
        self._files: dict[Path, IO[bytes]] = {}
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_periodically, args=(flush_interval,), daemon=True
        )
        self._flusher.start()

    def path_for(self, record: logging.LogRecord) -> Path:
        """The file a record goes to (placeholders filled from the record's rank)."""
        key = (getattr(record, "rank", None), getattr(record, "local_rank", None))
        path = self._paths.get(key)
        if path is None:
            if self.file_name is not None:
                path = self.file_name
            else:
                name = substitute_placeholders(
                    self.run_name, DEFAULT_JSONL_NAME, rank=key[0], local_rank=key[1],
                    now=self._started,
                )
                path = self.log_dir / f"{name}.jsonl"
            self._paths[key] = path
        return path

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, Mapping):
            warnings.warn(
                f"AsyncStructuredHandler expected a mapping, got {type(record.msg).__name__}; "
                "skipping. Add IsMappingFilter to this handler.",
                stacklevel=2,
            )
            return
        try:
            entry = flatten_dict(record.msg)
            step = getattr(record, "step", None)
            if step is not None:
                entry.setdefault("step", step)
            entry.setdefault("timestamp", datetime.fromtimestamp(record.created).isoformat())
            path = self.path_for(record)
            out = self._files.get(path)
            if out is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                out = self._files[path] = open(path, "ab", buffering=1 << 16)  # noqa: SIM115
            out.write(self._encode(entry))
        except Exception:
            self.handleError(record)

    def _flush_periodically(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            for out in self._files.values():
                out.flush()

    def close(self) -> None:
        self._stop.set()
        with self.lock:  # type: ignore[union-attr]
            for out in self._files.values():
                out.close()
            self._files.clear()
        super().close()

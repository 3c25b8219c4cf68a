"""What every rank policy is: the :class:`RankPolicy` contract (``policies.py`` has the
policies and how they are chosen), and the helpers they share."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from ranklog.backends.protocol import job_of
from ranklog.flatten import flatten_dict
from ranklog.run_name import MERGED_ATTR


def rank_of(record: logging.LogRecord) -> int:
    """The record's global rank (0 if it says none)."""
    rank = getattr(record, "rank", None)
    return int(rank) if rank is not None else 0


def derived(record: logging.LogRecord, msg: Any, **attrs: Any) -> logging.LogRecord:
    """A copy marked as merged across ranks, not an edit: other backends hold the same
    record object."""
    copy = logging.LogRecord.__new__(logging.LogRecord)
    copy.__dict__ = {**record.__dict__, "msg": msg, "args": None, MERGED_ATTR: True, **attrs}
    return copy


class RankPolicy:
    """Base policy: every record passes, hyper-parameters once.

    The backend's thread calls :meth:`accept` for each record, :meth:`due` when
    :meth:`next_deadline` passes, and :meth:`drain` on shutdown; each returns the records
    to hand to the backend, in order. Only that one thread touches a policy.
    """

    name = "all"

    def __init__(self, backend: str = "") -> None:
        self.backend = backend
        self._hparams_seen: set[str] = set()

    def accept(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        """Take one record; return what should reach the backend now."""
        if getattr(record, "hparams", False):
            return [record] if self._admit(record) and self._first_hparams(record) else []
        return self._metrics(record, now)

    def due(self, now: float) -> list[logging.LogRecord]:
        """Records whose wait ended by ``now`` (a reducing policy's timed-out steps)."""
        return []

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has something to return, in ``time.monotonic()`` seconds."""
        return None

    def drain(self) -> list[logging.LogRecord]:
        """Everything still held, for shutdown."""
        return []

    # A restarted policy is made new, given its :meth:`checkpoint` back (:meth:`restore`),
    # then the records it held (:meth:`held_starts`) are taken again in journal order, and
    # those from :meth:`remember_from` on are shown to it with nothing handed on.

    def remember(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        """See a record from before the checkpoint again, to remember it: as :meth:`accept`,
        but what it would hand on was handed on already (the caller drops it)."""
        return self.accept(record, now)

    def held_starts(self) -> list[int]:
        """Journal offsets (entry starts) of the records held back, not yet handed on."""
        return []

    def remember_from(self) -> int | None:
        """Journal offset (entry start) from which a restarted policy must see the records
        again to remember what it already handed on (None: it needs none)."""
        return None

    def checkpoint(self) -> dict[str, Any] | None:
        """What a restarted policy needs besides the records (see above): here, which
        hyper-parameters it already handed on."""
        return {"hparams": sorted(self._hparams_seen)} if self._hparams_seen else None

    def restore(self, state: dict[str, Any] | None) -> None:
        """Take back a :meth:`checkpoint`."""
        self._hparams_seen = set((state or {}).get("hparams", ()))

    def _admit(self, record: logging.LogRecord) -> bool:
        return True

    def _first_hparams(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        content = flatten_dict(msg) if isinstance(msg, Mapping) else str(msg)
        text = json.dumps([job_of(record), record.name, content], sort_keys=True, default=repr)
        key = hashlib.sha256(text.encode()).hexdigest()[:32]  # small enough to checkpoint
        if key in self._hparams_seen:
            return False
        self._hparams_seen.add(key)
        return True

    def _metrics(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        return [record]

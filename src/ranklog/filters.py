"""InstructLab's metric filters: ``IsMappingFilter``, ``IsRank0Filter``, ``FormatDictFilter``."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from ranklog.flatten import flatten_dict


class IsMappingFilter(logging.Filter):
    """Pass only records whose message is a mapping (a metrics dict)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return isinstance(record.msg, Mapping)


class IsRank0Filter(logging.Filter):
    """Pass only records from rank 0.

    The rank comes from the first of these sources that has one, in the seed's order:

    1. the explicit ``rank_val``;
    2. the record's ``rank`` (or ``local_rank``) attribute: in the collector, the rank the
       record came from;
    3. the ``rank`` (or ``local_rank``) key of the message dict;
    4. the ``RANK`` (or ``LOCAL_RANK``) environment variable;
    5. ``torch.distributed``, if it is initialised (global rank only);
    6. else 0.

    Unlike the seed, a 0 found at any step counts as 0 rather than falling through to the
    next source (``rank_val=0`` passes every record).
    """

    def __init__(self, rank_val: int | None = None, local_rank: bool = False) -> None:
        super().__init__()
        self.rank_val = rank_val
        self.rank_attr = "local_rank" if local_rank else "rank"

    def _rank(self, record: logging.LogRecord) -> int:
        if self.rank_val is not None:
            return int(self.rank_val)
        from_record = getattr(record, self.rank_attr, None)
        if from_record is not None:
            return int(from_record)
        msg = record.msg
        if isinstance(msg, Mapping) and msg.get(self.rank_attr) is not None:
            return int(msg[self.rank_attr])
        from_env = os.environ.get(self.rank_attr.upper())
        if from_env is not None:
            return int(from_env)
        torch = sys.modules.get("torch")
        if self.rank_attr == "rank" and torch is not None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
        return 0

    def filter(self, record: logging.LogRecord) -> bool:
        return self._rank(record) == 0


class FormatDictFilter(logging.Filter):
    """Render a metrics dict as ``key=value, ...`` for console handlers.

    Floats get three decimals, or scientific notation when tiny or large.
    """

    @staticmethod
    def _format_value(value: Any) -> str:
        if isinstance(value, float):
            if value != 0 and (abs(value) < 0.001 or abs(value) > 999):
                return f"{value:.2e}"
            return f"{value:.3f}"
        if isinstance(value, int):
            return f"{value:d}"
        return repr(value)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, Mapping):
            flat = flatten_dict(record.msg)
            record.msg = ", ".join(f"{k}={self._format_value(v)}" for k, v in flat.items())
        return True

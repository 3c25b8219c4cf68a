"""Envelopes back into ``LogRecord``s."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ranklog.backends.protocol import OFFSET_ATTR, START_ATTR

if TYPE_CHECKING:
    from ranklog.backends.journaled import RecordMap
    from ranklog.envelope import RecordEnvelope

# Every attribute LogRecord.__init__ sets, as it sets them for a record with no source
# location; build_record fills in the rest. Copying it costs a third of what __init__ does.
_TEMPLATE = logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
_START = getattr(logging, "_startTime", time.time())


def build_record(envelope: RecordEnvelope | RecordMap, start: int, end: int) -> logging.LogRecord:
    """The LogRecord a rank logged, with its origin as attributes.

    ``envelope`` is a decoded record: the typed struct of
    :class:`ranklog.envelope.RecordEnvelope`, or a
    :class:`ranklog.backends.journaled.RecordMap` (the same names, as keys) for a record the
    struct does not take.
    ``start`` and ``end`` are where the record's entry lies in the journal: backends and
    their policies use them to know what they already wrote, and where to resume.
    """
    # One getter for both shapes: one body builds the record either way (the struct's is
    # the hot path); the LogRecord's attributes are untyped anyway.
    get: Callable[[str], Any] = (
        envelope.__getitem__ if isinstance(envelope, dict) else envelope.__getattribute__
    )
    attrs = _TEMPLATE.copy()
    attrs.update(get("extra"))  # first: the fields below always win
    level = get("level")
    created = get("time")
    attrs["name"] = get("logger")
    attrs["msg"] = get("msg")
    attrs["levelno"] = level
    attrs["levelname"] = logging.getLevelName(level)
    attrs["created"] = created
    attrs["msecs"] = (created - int(created)) * 1000
    attrs["relativeCreated"] = (created - _START) * 1000
    attrs["process"] = get("pid")
    attrs["step"] = get("step")
    attrs["hparams"] = get("hparams")
    attrs["rank"] = get("rank")
    attrs["local_rank"] = get("local_rank")
    attrs["world_size"] = get("world_size")
    attrs["host"] = get("host")
    attrs["run_id"] = get("run")
    attrs[OFFSET_ATTR] = end
    attrs[START_ATTR] = start
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__ = attrs
    return record
